/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * hugepoke ioctl ABI, version 5 — the C view of src/uapi.rs.
 * See Documentation/abi.md.
 */
#ifndef _UAPI_HUGEPOKE_H
#define _UAPI_HUGEPOKE_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define HUGEPOKE_ABI_VERSION 5
#define HUGEPOKE_MAX_BYTES 16
#define HUGEPOKE_MAX_BATCH 16384
#define HUGEPOKE_MAX_TARGET_SITES 131072
#define HUGEPOKE_NO_SITE 0xffffffffU

#define HUGEPOKE_PATCH_PERSIST     (1U << 0)
#define HUGEPOKE_PATCH_EXPECT      (1U << 1)
#define HUGEPOKE_PATCH_INSTALL_PMD (1U << 2)
#define HUGEPOKE_PATCH_OVER_CHANGED (1U << 3)

#define HUGEPOKE_RESTORE_DROP (1U << 0)

#define HUGEPOKE_STATE_LIVE 1
#define HUGEPOKE_STATE_GONE 2

struct hugepoke_patch {
	__u32 size;		/* in: sizeof(struct hugepoke_patch) */
	__u32 flags;		/* in: HUGEPOKE_PATCH_* */
	__s32 pid;		/* in: target, in the caller's pid namespace */
	__u32 len;		/* in: 1..HUGEPOKE_MAX_BYTES, within one page */
	__u64 addr;		/* in: address in the target's file-backed text */
	__u8 bytes[HUGEPOKE_MAX_BYTES];	/* in: new bytes */
	__u8 expect[HUGEPOKE_MAX_BYTES];	/* in: expected bytes (PATCH_EXPECT) */
	__u64 handle;		/* out */
};

struct hugepoke_batch_site {
	__u64 addr;		/* in: address in the target's file-backed text */
	__u32 len;		/* in: 1..HUGEPOKE_MAX_BYTES, within one page */
	__u32 flags;		/* in: HUGEPOKE_PATCH_EXPECT or 0 */
	__u8 bytes[HUGEPOKE_MAX_BYTES];	/* in: new bytes */
	__u8 expect[HUGEPOKE_MAX_BYTES];	/* in: expected bytes */
};

struct hugepoke_patch_batch {
	__u32 size;		/* in: sizeof(struct hugepoke_patch_batch) */
	__u32 flags;		/* in: HUGEPOKE_PATCH_PERSIST, _INSTALL_PMD, _OVER_CHANGED */
	__s32 pid;		/* in: target, in the caller's pid namespace */
	__u32 count;		/* in: 1..HUGEPOKE_MAX_BATCH */
	__u64 sites;		/* in: pointer to count struct hugepoke_batch_site */
	__u64 handle;		/* out: one handle for every site; on failure 0, or
				 * the handle keeping what could not be undone */
	__u32 failed;		/* out: index of the failed site, or HUGEPOKE_NO_SITE */
	__s32 error;		/* out: positive errno of that site */
};

/* PATCH_FILE: find the processes, write nothing. */
#define HUGEPOKE_FILE_DRY_RUN (1U << 8)
#define HUGEPOKE_MAX_FILE_PROCESSES 1024

/* PATCH_FILE: the sites of a file's text in every process that maps them
 * privately and executably (the caller excepted), all or none, under one
 * handle.  CAP_SYS_ADMIN. */
struct hugepoke_patch_file {
	__u32 size;		/* in: sizeof(struct hugepoke_patch_file) */
	__u32 flags;		/* in: HUGEPOKE_PATCH_PERSIST, _INSTALL_PMD,
				 * _OVER_CHANGED, HUGEPOKE_FILE_DRY_RUN */
	__s32 fd;		/* in: an open fd of the (regular) file */
	__u32 count;		/* in: 1..HUGEPOKE_MAX_BATCH */
	__u64 sites;		/* in: pointer to count struct hugepoke_batch_site,
				 * addr being an offset in the file */
	__u64 pids;		/* in: pointer to max_pids __s32; out: the
				 * processes (would be) patched, ascending */
	__u32 max_pids;		/* in: room in pids (fewer: E2BIG) */
	__u32 nr_pids;		/* out: processes that map the sites */
	__u64 handle;		/* out: one handle for every process; on failure
				 * 0, or the handle keeping what was not undone */
	__u32 failed;		/* out: index of the failed site, or HUGEPOKE_NO_SITE */
	__s32 error;		/* out: positive errno */
	__s32 failed_pid;	/* out: the process that failed, or 0 */
	__u32 reserved;		/* in: 0 */
};

struct hugepoke_restore {
	__u32 size;		/* in: sizeof(struct hugepoke_restore) */
	__u32 flags;		/* in: HUGEPOKE_RESTORE_DROP or 0 */
	__u64 handle;		/* in */
};

/* QUERY: instead of a site, the index-th process (by pid, in pid) of the
 * count forked while the patch lived that run it now. */
#define HUGEPOKE_QUERY_FORKED (1U << 0)

struct hugepoke_query {
	__u32 size;		/* in: sizeof(struct hugepoke_query) */
	__u32 flags;		/* in: HUGEPOKE_QUERY_FORKED or 0 */
	__u64 handle;		/* in */
	__u32 state;		/* out: HUGEPOKE_STATE_* */
	__s32 pid;		/* out */
	__u64 addr;		/* out */
	__u32 len;		/* out */
	__u32 patch_flags;	/* out */
	__u64 pfn;		/* out: the anonymous page holding the patch
				 * (0 without CAP_SYS_ADMIN) */
	__u8 orig[HUGEPOKE_MAX_BYTES];	/* out: bytes before the patch */
	__u8 bytes[HUGEPOKE_MAX_BYTES];	/* out: bytes written */
	__u32 index;		/* in: the handle's Nth live site, 0..count */
	__u32 count;		/* out: live sites under the handle */
	__u32 site;		/* out: that site's place in the batch's array */
	__u32 reserved;		/* out: 0 */
};

#define HUGEPOKE_COLLAPSE_INSTALL_PMD (1U << 0)

/* struct hugepoke_collapse.result */
#define HUGEPOKE_COLLAPSE_DONE        1	/* a PMD maps the range */
#define HUGEPOKE_COLLAPSE_AT_FAULT    2	/* table retracted; PMD at next fault */
#define HUGEPOKE_COLLAPSE_COPIES_KEPT 3	/* copies kept (kept_*): not collapsed */
#define HUGEPOKE_COLLAPSE_SMALL_FOLIOS 4	/* no PMD-sized page-cache folio */
#define HUGEPOKE_COLLAPSE_REFUSED     5	/* collapse_pte_mapped_thp() refused */

struct hugepoke_collapse {
	__u32 size;		/* in: sizeof(struct hugepoke_collapse) */
	__u32 flags;		/* in: HUGEPOKE_COLLAPSE_INSTALL_PMD or 0 */
	__s32 pid;		/* in: target, in the caller's pid namespace */
	__u32 result;		/* out: HUGEPOKE_COLLAPSE_* */
	__u64 addr;		/* in: 2 MiB-aligned, in private executable file text */
	__u32 dropped;		/* out: copies equal to the page cache, dropped */
	__u32 kept_differs;	/* out: kept: they differ from the page cache */
	__u32 kept_pinned;	/* out: kept: something else holds them */
	__u32 kept_uffd;	/* out: kept: userfaultfd is registered */
	__u32 kept_patched;	/* out: kept: a live hugepoke patch is on them */
	__u32 kept_no_cache;	/* out: kept: no uptodate page-cache page */
	__u64 first_kept;	/* out: address of the first copy kept, or 0 */
};

#define HUGEPOKE_IOCTL_PATCH   _IOWR('H', 1, struct hugepoke_patch)
#define HUGEPOKE_IOCTL_RESTORE _IOWR('H', 2, struct hugepoke_restore)
#define HUGEPOKE_IOCTL_QUERY   _IOWR('H', 3, struct hugepoke_query)
#define HUGEPOKE_IOCTL_PATCH_BATCH _IOWR('H', 4, struct hugepoke_patch_batch)
#define HUGEPOKE_IOCTL_COLLAPSE _IOWR('H', 5, struct hugepoke_collapse)
#define HUGEPOKE_IOCTL_PATCH_FILE _IOWR('H', 6, struct hugepoke_patch_file)

#endif /* _UAPI_HUGEPOKE_H */
