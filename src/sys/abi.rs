// SPDX-License-Identifier: GPL-2.0

//! The ABI structs of `uapi` as plain bytes, so the device can copy them
//! from and to userspace whole.

use kernel::transmute::{AsBytes, FromBytes};

use crate::uapi::{
    BatchSite, CollapseArgs, PatchArgs, PatchBatchArgs, PatchFileArgs, QueryArgs, RestoreArgs,
};

// SAFETY: plain `repr(C)` structs of integers and byte arrays without
// padding (sizes asserted in `uapi`): every bit pattern is valid, and all
// bytes are initialized.
unsafe impl FromBytes for PatchArgs {}
// SAFETY: as above.
unsafe impl AsBytes for PatchArgs {}
// SAFETY: as above.
unsafe impl FromBytes for PatchBatchArgs {}
// SAFETY: as above.
unsafe impl AsBytes for PatchBatchArgs {}
// SAFETY: as above.
unsafe impl FromBytes for BatchSite {}
// SAFETY: as above.
unsafe impl AsBytes for BatchSite {}
// SAFETY: as above.
unsafe impl FromBytes for RestoreArgs {}
// SAFETY: as above.
unsafe impl FromBytes for QueryArgs {}
// SAFETY: as above.
unsafe impl AsBytes for QueryArgs {}
// SAFETY: as above.
unsafe impl FromBytes for CollapseArgs {}
// SAFETY: as above.
unsafe impl AsBytes for CollapseArgs {}
// SAFETY: as above.
unsafe impl FromBytes for PatchFileArgs {}
// SAFETY: as above.
unsafe impl AsBytes for PatchFileArgs {}
