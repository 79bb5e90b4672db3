/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The C wrappers compiled into hugepoke.ko (helpers.c); src/sys/mod.rs declares
 * the same functions for Rust.
 */
#ifndef HUGEPOKE_HELPERS_H
#define HUGEPOKE_HELPERS_H

#include <linux/mm_types.h>
#include <linux/mmu_notifier.h>
#include <linux/mutex.h>
#include <linux/pagewalk.h>

unsigned long hugepoke_page_to_pfn(const struct page *page);
struct folio *hugepoke_page_folio(struct page *page);
struct folio *hugepoke_page_cache_folio(struct address_space *mapping,
					pgoff_t index);
struct page *hugepoke_folio_file_page(struct folio *folio, pgoff_t index);
bool hugepoke_page_anon_exclusive(const struct page *page);
void hugepoke_folio_put(struct folio *folio);
void hugepoke_folio_get(struct folio *folio);

pid_t hugepoke_mm_owner(struct mm_struct *mm);
pid_t hugepoke_mm_owner_tgid(struct mm_struct *mm);
/* One private executable VMA of a file (hugepoke_file_vmas). */
struct hugepoke_file_vma {
	struct mm_struct *mm;
	unsigned long start, end;
	pgoff_t pgoff;
};
int hugepoke_file_vmas(struct file *file, pgoff_t index,
		       struct hugepoke_file_vma *out, int max, pgoff_t *next);
int hugepoke_family_vmas(struct file *file, pgoff_t index, unsigned long family,
			 struct mm_struct *skip, struct hugepoke_file_vma *out,
			 int max, pgoff_t *next);
unsigned long hugepoke_folio_family(struct folio *folio);
struct anon_vma *hugepoke_folio_hold_family(struct folio *folio);
void hugepoke_put_family(struct anon_vma *root);
unsigned long hugepoke_vma_family(struct vm_area_struct *vma);
bool hugepoke_family_may_have_others(struct vm_area_struct *vma, unsigned long family);
u64 hugepoke_boottime_ns(void);
struct pid *hugepoke_parent_tgid(struct task_struct *task);
int hugepoke_forked_since(struct mm_struct *mm, u64 since, struct pid *target,
			  struct mm_struct *target_mm, struct pid *parent, u64 until);
int hugepoke_folio_unexpected_refs(struct folio *folio);
bool hugepoke_folio_is_anon(struct folio *folio);
bool hugepoke_folio_may_be_lru_cached(struct folio *folio);
bool hugepoke_folio_mapped_elsewhere(struct folio *folio);
unsigned int hugepoke_folio_order(const struct folio *folio);
bool hugepoke_folio_uptodate(const struct folio *folio);
bool hugepoke_folio_pmd_mappable(struct folio *folio);
bool hugepoke_pte_write(pte_t pte);
bool hugepoke_pte_uffd_wp(struct vm_area_struct *vma, pte_t pte);
pte_t hugepoke_pte_unmap(struct vm_area_struct *vma, unsigned long addr,
			 pte_t *ptep, pte_t pte);
void hugepoke_pte_remap(struct vm_area_struct *vma, unsigned long addr,
			pte_t *ptep, pte_t pte, bool dirty);
int hugepoke_zap_anon_pte(struct vm_area_struct *vma, struct folio *folio,
			  struct page *page);
void hugepoke_folio_walk_end(struct folio_walk *fw, struct vm_area_struct *vma);
void hugepoke_invalidate_start(struct mmu_notifier_range *range,
			       struct mm_struct *mm, unsigned long start,
			       unsigned long end);
void hugepoke_invalidate_end(struct mmu_notifier_range *range);
struct vm_area_struct *hugepoke_next_vma_mapping(struct mm_struct *mm,
						 unsigned long addr,
						 struct address_space *mapping,
						 pgoff_t pgoff);
bool hugepoke_uffd_armed(struct vm_area_struct *vma);
bool hugepoke_uffd_missing(struct vm_area_struct *vma);
bool hugepoke_uffd_wp(struct vm_area_struct *vma);
bool hugepoke_uffd_minor(struct vm_area_struct *vma);
pgoff_t hugepoke_vma_file_pages(struct vm_area_struct *vma);
struct folio *hugepoke_read_file_folio(struct vm_area_struct *vma, pgoff_t index);
int hugepoke_mmap_write_lock_killable(struct mm_struct *mm);
void hugepoke_mmap_write_unlock(struct mm_struct *mm);
int hugepoke_mutex_lock_killable(struct mutex *lock);
bool hugepoke_fatal_signal_pending(void);
bool hugepoke_module_get(void);
void hugepoke_module_put(void);

/*
 * The journal's steps, in the order of `Step` in src/journal.rs (the Rust
 * enum's values index this list; a KUnit test checks the names agree).
 * Each is a trace event, hugepoke:hugepoke_<step> (hugepoke_trace.h).
 */
#define HUGEPOKE_STEPS(x)						\
	x(load) x(unload) x(open) x(release) x(ioctl)			\
	x(patch) x(resolve_target) x(check_vma) x(check_expected)	\
	x(split_pmd) x(cow_page) x(write_bytes) x(patched)		\
	x(restore) x(restore_bytes) x(lru_drain) x(zap_anon_page)	\
	x(keep_anon_page) x(queue_collapse) x(collapse) x(restored)	\
	x(query) x(collapse_range) x(pause) x(resume)

void hugepoke_trace(unsigned int step, u64 seq, pid_t pid, u64 handle,
		    unsigned long addr, unsigned long pfn, int order, int err,
		    const char *reason, size_t reason_len);
const char *hugepoke_trace_step_name(unsigned int step);

#endif /* HUGEPOKE_HELPERS_H */
