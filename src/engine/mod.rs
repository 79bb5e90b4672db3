// SPDX-License-Identifier: GPL-2.0

//! PATCH and RESTORE as one procedure over a plan of file pages: the steps
//! of the THP-aware uprobe series, as `uprobe_write()`/`__uprobe_write()`
//! take them in 7.2, for any number of sites, each step journaled.
//!
//! A request — one site, a batch, or the sites of a handle to restore —
//! becomes a [`plan`] of file pages, and every page goes through the same
//! small steps ([`page`]): split the PMD and copy, write under the
//! page-table lock against the expected bytes, find the copy again
//! ([`locate`]), write the originals back, zap if clean, queue the
//! collapse ([`restore`]).  A single PATCH is a plan of one site ([`patch`]),
//! RESTORE has one path whatever the count ([`settle`]), and the undo of a
//! failed PATCH is RESTORE's own passes; RESTORE first runs them in the
//! processes forked while the patch lived ([`forked`]).  PATCH_FILE is
//! PATCH in every process that maps a file, all or none ([`file`]).  COLLAPSE drops the copies other
//! tools left by RESTORE's rule for zapping a copy ([`zap`]) ([`foreign`]).  Files and their imports go one
//! way: `owned → settle → restore → {page → locate} → plan → outcome`, and
//! `patch → {restore, page, plan}`.

mod file;
mod foreign;
mod forked;
mod lineage;
mod locate;
mod outcome;
mod owned;
mod page;
mod patch;
mod plan;
mod restore;
mod settle;
mod zap;

pub(crate) use file::{
    forget_file_handles, members as file_members, patch_file, patches_of, restore_any,
    restore_file, site_of as file_site, FileFailure, Member,
};
pub(crate) use foreign::collapse;
pub(crate) use forked::forked_of;
pub(crate) use outcome::{Closing, Failure};
pub(crate) use owned::restore_owned;
pub(crate) use patch::patch;
pub(crate) use plan::{check_sites, Request};
pub(crate) use settle::{drop_handle, restore_of};
