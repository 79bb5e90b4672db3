// SPDX-License-Identifier: GPL-2.0

//! `/dev/hugepoke`: one `Controller` per open file.

use kernel::{
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceRegistration},
    prelude::*,
    sync::Arc,
};

use crate::{journal::Step, Hugepoke};

/// The state of one open file of `/dev/hugepoke`.
pub(crate) struct Controller {
    hugepoke: Arc<Hugepoke>,
}

#[vtable]
impl MiscDevice for Controller {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        let hugepoke = Hugepoke::get().ok_or(ENODEV)?;
        hugepoke.journal.record(Step::Open.event());
        Ok(KBox::new(Self { hugepoke }, GFP_KERNEL)?)
    }

    fn release(this: KBox<Self>, _file: &File) {
        this.hugepoke.journal.record(Step::Release.event());
    }

    fn ioctl(this: &Self, _file: &File, cmd: u32, _arg: usize) -> Result<isize> {
        this.hugepoke
            .journal
            .record(Step::Ioctl.event().error(ENOTTY, "unknown ioctl command").addr(cmd as usize));
        Err(ENOTTY)
    }
}
