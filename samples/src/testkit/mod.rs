//! Test fixtures, not product: what the in-guest tests, the bench, the
//! stress and fuzz tools and thp-target use to make and drive THP text
//! targets.  The CLI uses none of it.
//!
//! - [`text`]: the 2 MiB blob of tiny functions the targets execute.
//! - [`thp`]: mapping it 2 MiB-aligned so that a PMD can map it.
//! - [`target`]: spawning and asking a `thp-target` process.
//! - [`backing`]: the filesystems and tmpfs mounts the text is put on, and
//!   swap.
//! - [`check_state`]: what hugepoke-stress shares with its target's checkers.
//! - [`khugepaged`]: khugepaged held asleep.
//! - [`uprobe`]: a tracefs uprobe on the text, for its life.
//! - [`pause`]: the module's pause points, armed and released.

pub mod backing;
pub mod check_state;
pub mod khugepaged;
pub mod pause;
pub mod target;
pub mod text;
pub mod thp;
pub mod uprobe;
