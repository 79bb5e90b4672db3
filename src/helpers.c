// SPDX-License-Identifier: GPL-2.0
/*
 * The C that hugepoke needs: out-of-line copies of the static inlines and
 * macros that bindgen cannot expose.  They are linked into hugepoke.ko
 * itself (see Kbuild), so the kernel series adds no helper to vmlinux;
 * src/sys/mod.rs declares them and is their only caller.
 */

#include <linux/highmem.h>
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pagemap.h>
#include <linux/pagewalk.h>
#include <linux/rmap.h>
#include <linux/sched/signal.h>
#include <linux/shmem_fs.h>
#include <linux/swap.h>
#include <linux/userfaultfd_k.h>

#include "helpers.h"

#define CREATE_TRACE_POINTS
#include "hugepoke_trace.h"

/* The mmap lock, for writing (the Rust `mm` module takes it for reading only). */

int hugepoke_mmap_write_lock_killable(struct mm_struct *mm)
{
	return mmap_write_lock_killable(mm);
}

/* Killable waits (a macro under lockdep; a static inline). */

int hugepoke_mutex_lock_killable(struct mutex *lock)
{
	return mutex_lock_killable(lock);
}

bool hugepoke_fatal_signal_pending(void)
{
	return fatal_signal_pending(current);
}

void hugepoke_mmap_write_unlock(struct mm_struct *mm)
{
	mmap_write_unlock(mm);
}

/* Pages and folios. */

unsigned long hugepoke_page_to_pfn(const struct page *page)
{
	return page_to_pfn(page);
}

struct folio *hugepoke_page_folio(struct page *page)
{
	return page_folio(page);
}

bool hugepoke_page_anon_exclusive(const struct page *page)
{
	return PageAnonExclusive(page);
}

void hugepoke_folio_put(struct folio *folio)
{
	folio_put(folio);
}

void hugepoke_folio_get(struct folio *folio)
{
	folio_get(folio);
}

/* References beyond those of its mappings, the page/swap cache and one GUP. */
int hugepoke_folio_unexpected_refs(struct folio *folio)
{
	return folio_ref_count(folio) - folio_expected_ref_count(folio) - 1;
}

bool hugepoke_folio_is_anon(struct folio *folio)
{
	return folio_test_anon(folio) && !folio_is_zone_device(folio);
}

/* Small folios may sit in a per-CPU LRU batch that holds a reference. */
bool hugepoke_folio_may_be_lru_cached(struct folio *folio)
{
	return folio_may_be_lru_cached(folio);
}

/*
 * Does a page table other than the caller's map this small, ordinary
 * anonymous folio?  (A KSM or large folio's mapcount says nothing about
 * one patched page.)
 */
bool hugepoke_folio_mapped_elsewhere(struct folio *folio)
{
	return !folio_test_ksm(folio) && !folio_test_large(folio) &&
	       folio_mapcount(folio) > 1;
}

/*
 * The fork family of an anonymous @folio: the root of its anon_vma, which
 * every process forked from its mapper shares (an identity, never
 * dereferenced by the caller); 0 for a KSM or non-anonymous folio.  The
 * caller holds the mmap lock of a VMA whose anon_vma chain holds the
 * folio's anon_vma (PATCH, with the PTE cleared under the PT lock).
 */
unsigned long hugepoke_folio_family(struct folio *folio)
{
	unsigned long mapping = (unsigned long)READ_ONCE(folio->mapping);

	if ((mapping & FOLIO_MAPPING_FLAGS) != FOLIO_MAPPING_ANON)
		return 0;
	return (unsigned long)((struct anon_vma *)(mapping - FOLIO_MAPPING_ANON))->root;
}

/*
 * As hugepoke_folio_family(), with a reference taken on that root
 * anon_vma (NULL where there is no family): while a patch lives, its
 * family's identity cannot be given to an anon_vma made since.  (What
 * get_anon_vma() does; it is an inline of mm/internal.h.)
 */
struct anon_vma *hugepoke_folio_hold_family(struct folio *folio)
{
	struct anon_vma *root = (struct anon_vma *)hugepoke_folio_family(folio);

	if (root)
		atomic_inc(&root->refcount);
	return root;
}

/* Exported to hugepoke by patches/0007; declared in mm/internal.h. */
void __put_anon_vma(struct anon_vma *anon_vma);

/*
 * Drop a reference hugepoke_folio_hold_family() took, as put_anon_vma()
 * does: the last one frees the anon_vma (may sleep).
 */
void hugepoke_put_family(struct anon_vma *root)
{
	if (atomic_dec_and_test(&root->refcount))
		__put_anon_vma(root);
}

/* The fork family of @vma's anonymous pages (its mmap lock held), or 0. */
unsigned long hugepoke_vma_family(struct vm_area_struct *vma)
{
	return vma->anon_vma ? (unsigned long)vma->anon_vma->root : 0;
}

/*
 * May processes other than @vma's own map pages of fork @family?  Unless
 * @vma's anon_vma is the family's root and no fork ever gave that root a
 * child anon_vma (it counts itself: 1).  Racy reads under @vma's mmap
 * lock, which a fork of this process takes too: a hint to skip a walk of
 * who else maps a page, never a reason to write.
 */
bool hugepoke_family_may_have_others(struct vm_area_struct *vma, unsigned long family)
{
	struct anon_vma *anon_vma = READ_ONCE(vma->anon_vma);

	return !anon_vma || (unsigned long)anon_vma != family ||
	       data_race(anon_vma->root) != anon_vma ||
	       data_race(anon_vma->num_children) > 1; /* mutant: family-walk-always */
}

u64 hugepoke_boottime_ns(void)
{
	return ktime_get_boottime_ns();
}

#ifndef CONFIG_MEMCG
#error "hugepoke finds a process by its mm through mm->owner (CONFIG_MEMCG)"
#endif

/* The thread group of @task's parent, counted (NULL once it is reaped). */
struct pid *hugepoke_parent_tgid(struct task_struct *task)
{
	struct pid *pid;

	rcu_read_lock();
	pid = get_pid(task_tgid(rcu_dereference(task->group_leader->real_parent)));
	rcu_read_unlock();
	return pid;
}

/*
 * Was @mm's process forked, since @since (boot-time ns), from the process
 * @target (NULL: gone), or from a process forked from it since?  Its
 * ancestors forked since are climbed to the first that is older: 1 if
 * that is @target's thread group or shares @target_mm with it (a
 * clone(CLONE_VM) peer forks from the very pages); 0 if it is another process that
 * certainly did not fork it from the target's line (forked before, or
 * from a process forked before the patch), and also when the target's
 * own child on the way started at or after @until (the target was
 * restored then: what it forked since is not the patch's); 2 when whose
 * it was is no longer known, and the caller must ask more of it: a
 * reaper on the way (init of its pid namespace, a subreaper, also the
 * target if it is one), to which a process is given when its parent
 * exits (also one that was a subreaper and is no more, where the
 * has_child_subreaper marks tell), or a start time equal to @since, which says neither before nor
 * after; 3 when the climb ends at @parent, the target's parent: a
 * CLONE_PARENT child of the target has it, and so does the target's
 * sibling, so only the target's own page can tell.
 */
int hugepoke_forked_since(struct mm_struct *mm, u64 since, struct pid *target,
			  struct mm_struct *target_mm, struct pid *parent, u64 until)
{
	struct task_struct *p, *q;
	struct pid *tgid;
	int forked = 0;

	rcu_read_lock();
	p = rcu_dereference(mm->owner);
	if (!p || p->group_leader->start_boottime < since) /* mutant: forked-before-patch-taken */
		goto out;
	forked = 2;
	if (p->group_leader->start_boottime == since)
		goto out;
	for (;;) {
		q = rcu_dereference(p->group_leader->real_parent);
		tgid = task_tgid(q);
		if ((tgid && is_child_reaper(tgid)) || q->signal->is_child_subreaper) /* mutant: reaper-target-trusted */
			break;
		/*
		 * A subreaper that has cleared its flag since it adopted @p:
		 * has_child_subreaper never clears, so @p has it from a
		 * (former) subreaper that @q's own line does not explain, and
		 * @q may be its adopter.  (Under a subreaper above @q, both
		 * have it, and this says nothing.)
		 */
		if (p->signal->has_child_subreaper && !q->signal->has_child_subreaper) /* mutant: cleared-subreaper-trusted reaper-target-trusted/2 */
			break;
		if (q->group_leader->start_boottime == since)
			break;
		if (q->group_leader->start_boottime > since && q != p) {
			p = q;
			continue;
		}
		if (!tgid)
			break;
		if (tgid == target) /* mutant: forked-ancestry-unchecked */
			forked = 1;
		else if (target_mm && READ_ONCE(q->mm) == target_mm) /* mutant: clone-vm-peer-unknown */
			forked = 1;
		else if (tgid == parent)
			/* mutant: clone-parent-trusted */
			forked = 3;
		else
			forked = 0;
		if (p->group_leader->start_boottime >= until) /* mutant: forked-after-restore-taken */
			forked = 0;
		break;
	}
out:
	rcu_read_unlock();
	return forked;
}

unsigned int hugepoke_folio_order(const struct folio *folio)
{
	return folio_order(folio);
}

bool hugepoke_folio_uptodate(const struct folio *folio)
{
	return folio_test_uptodate(folio);
}

bool hugepoke_folio_pmd_mappable(struct folio *folio)
{
	return folio_test_pmd_mappable(folio);
}

/* The page-cache folio at @index of @mapping, counted, or NULL. */
struct folio *hugepoke_page_cache_folio(struct address_space *mapping,
					pgoff_t index)
{
	struct folio *folio = filemap_get_folio(mapping, index);

	return IS_ERR(folio) ? NULL : folio;
}

struct page *hugepoke_folio_file_page(struct folio *folio, pgoff_t index)
{
	return folio_file_page(folio, index);
}

/* Page tables, with the PT lock held through the folio_walk. */

bool hugepoke_pte_write(pte_t pte)
{
	return pte_write(pte);
}

bool hugepoke_pte_uffd_wp(struct vm_area_struct *vma, pte_t pte)
{
	return userfaultfd_pte_wp(vma, pte);
}

/* Clear the PTE and flush the TLB; returns the old PTE. */
pte_t hugepoke_pte_unmap(struct vm_area_struct *vma, unsigned long addr,
			 pte_t *ptep, pte_t pte)
{
	flush_cache_page(vma, addr, pte_pfn(pte));
	return ptep_clear_flush(vma, addr, ptep);
}

/*
 * Set the cleared PTE back: dirty if the page was modified (seed 000), as
 * it was if it was only read (a refusal dirties nothing soft-dirty sees).
 */
void hugepoke_pte_remap(struct vm_area_struct *vma, unsigned long addr,
			pte_t *ptep, pte_t pte, bool dirty)
{
	/* The writes to the page before the PTE that exposes them. */
	smp_wmb();
	set_pte_at(vma->vm_mm, addr, ptep, dirty ? pte_mkdirty(pte) : pte);
}

/*
 * Drop the (cleared) PTE's anonymous page from @vma for good, as
 * __uprobe_write() does, freeing its swap slot once nothing maps it.
 * Returns 0 if the folio was not in the swap cache, 1 if its slot was
 * freed, 2 if it stays in the swap cache (locked by someone, or under
 * writeback: reclaim frees it later).
 */
int hugepoke_zap_anon_pte(struct vm_area_struct *vma, struct folio *folio,
			  struct page *page)
{
	int swapcache = folio_test_swapcache(folio) ? 2 : 0;

	dec_mm_counter(vma->vm_mm, MM_ANONPAGES);
	folio_remove_rmap_pte(folio, page, vma);
	if (!folio_mapped(folio) && folio_test_swapcache(folio) &&
	    folio_trylock(folio)) {
		if (folio_free_swap(folio))
			swapcache = 1;
		folio_unlock(folio);
	}
	folio_put(folio);
	return swapcache;
}

/*
 * The tgid (as the caller's pid namespace sees it) of @mm's owner: 0 if
 * the namespace does not see it, -1 if @mm has no owner (its last task is
 * exiting, or no CONFIG_MEMCG).
 */
pid_t hugepoke_mm_owner(struct mm_struct *mm)
{
	pid_t tgid = -1;
#ifdef CONFIG_MEMCG
	struct task_struct *owner;

	rcu_read_lock();
	owner = rcu_dereference(mm->owner);
	if (owner)
		tgid = task_tgid_vnr(owner);
	rcu_read_unlock();
#endif
	return tgid;
}

/* The tgid of @mm's owner in the caller's pid namespace, or 0. */
pid_t hugepoke_mm_owner_tgid(struct mm_struct *mm)
{
	return max(hugepoke_mm_owner(mm), 0);
}

void hugepoke_folio_walk_end(struct folio_walk *fw, struct vm_area_struct *vma)
{
	folio_walk_end(fw, vma);
}

/* mmu notifiers around a zap: started before the PT lock (may sleep). */

void hugepoke_invalidate_start(struct mmu_notifier_range *range,
			       struct mm_struct *mm, unsigned long start,
			       unsigned long end)
{
	mmu_notifier_range_init(range, MMU_NOTIFY_CLEAR, 0, mm, start, end);
	mmu_notifier_invalidate_range_start(range);
}

void hugepoke_invalidate_end(struct mmu_notifier_range *range)
{
	mmu_notifier_invalidate_range_end(range);
}

/* VMAs. */

/*
 * The first VMA at or above @addr whose file is @mapping and that covers
 * its page @pgoff, or NULL: one VMA-iterator step per VMA of any other
 * file, where a find_vma() per VMA would search the tree from the root.
 * A filter only: the caller still decides (vma_info(), address_in()).
 * Under the mmap lock.
 */
struct vm_area_struct *hugepoke_next_vma_mapping(struct mm_struct *mm,
						 unsigned long addr,
						 struct address_space *mapping,
						 pgoff_t pgoff)
{
	VMA_ITERATOR(vmi, mm, addr);
	struct vm_area_struct *vma;

	for_each_vma(vmi, vma)
		if (vma->vm_file && vma->vm_file->f_mapping == mapping && /* mutant: address-identity-remap/2 */
		    pgoff >= vma->vm_pgoff &&
		    pgoff - vma->vm_pgoff < vma_pages(vma)) /* mutant: next-vma-first-page-only next-vma-last-page-missed next-vma-first-page-missed */
			return vma;
	return NULL;
}

bool hugepoke_uffd_armed(struct vm_area_struct *vma)
{
	return userfaultfd_armed(vma);
}

bool hugepoke_uffd_missing(struct vm_area_struct *vma)
{
	return userfaultfd_missing(vma);
}

bool hugepoke_uffd_wp(struct vm_area_struct *vma)
{
	return userfaultfd_wp(vma);
}

bool hugepoke_uffd_minor(struct vm_area_struct *vma)
{
	return userfaultfd_minor(vma);
}

/*
 * The uptodate page-cache folio holding page @index of the file @vma maps,
 * read in if need be (may sleep), the way uprobes' __copy_insn() reads the
 * file's instruction (shmem has no ->read_folio).  Counted, or an ERR_PTR.
 */
static struct folio *hugepoke_file_folio(struct file *file, pgoff_t index)
{
	struct address_space *mapping = file->f_mapping;

	if (mapping->a_ops->read_folio)
		return read_mapping_folio(mapping, index, file);
	/* As uprobe_register(): no ->read_folio and not shmem (DAX) is no text we read. */
	if (!shmem_mapping(mapping))
		return ERR_PTR(-EIO);
	return shmem_read_folio(mapping, index);
}

struct folio *hugepoke_read_file_folio(struct vm_area_struct *vma, pgoff_t index)
{
	return hugepoke_file_folio(vma->vm_file, index);
}

/* Who maps a file's page: the rmap walk of its page-cache folio. */

struct hugepoke_file_walk {
	struct mm_struct *skip;
	/* Only VMAs of this fork family (hugepoke_folio_family), unless 0. */
	unsigned long family;
	struct hugepoke_file_vma *out;
	int max, n;
};

/* Only private executable text, as uprobes' valid_vma() asks (VM_EXEC: the text that runs). */
static bool hugepoke_not_private_text(struct vm_area_struct *vma, void *arg)
{
	struct hugepoke_file_walk *w = arg;
	struct anon_vma *anon_vma;
	bool other = false;

	if (w->family) {
		/*
		 * Racy (no mmap lock): a filter only, checked again under the
		 * mmap lock.  anon_vmas are SLAB_TYPESAFE_BY_RCU: ->root is
		 * read from an anon_vma, never dereferenced.
		 */
		rcu_read_lock();
		anon_vma = data_race(vma->anon_vma);
		other = !anon_vma || (unsigned long)data_race(anon_vma->root) != w->family;
		rcu_read_unlock();
	}
	if (other || vma->vm_mm == w->skip || (vma->vm_flags & (VM_MAYSHARE | VM_HUGETLB)))
		return true;
	/*
	 * A forked process may have made its copy of the text writable or
	 * not executable since: it still holds the patch (and may run it
	 * again), so the family walk names it, and RESTORE refuses there.
	 */
	return !w->family && !(vma->vm_flags & VM_EXEC); /* mutant: file-walk-any-vma family-walk-exec-only */
}

static bool hugepoke_file_vma_one(struct folio *folio, struct vm_area_struct *vma,
				  unsigned long addr, void *arg)
{
	struct hugepoke_file_walk *w = arg;

	if (w->n == w->max)
		return false;
	/* Only recorded: each is checked again under its own mmap lock. */
	mmgrab(vma->vm_mm);
	w->out[w->n].mm = vma->vm_mm;
	w->out[w->n].start = vma->vm_start;
	w->out[w->n].end = vma->vm_end;
	w->out[w->n].pgoff = vma->vm_pgoff;
	w->n++;
	return true;
}

/*
 * Every private executable VMA but the caller's (with a family: every private
 * VMA of it, executable or not, but @skip's) that maps a page of the folio
 * holding page @index of @file, at most @max, each mm with an mm_count
 * reference for the caller to drop: the number recorded (@max: maybe
 * more), and in *@next the first page past the folio.  The way uprobes'
 * build_map_info() walks i_mmap, through the exported rmap_walk() on the
 * page-cache folio (read in if need be), under the folio lock.  -ENXIO
 * past EOF, -EINVAL for no regular file, -EINTR on a fatal signal.
 */
static int hugepoke_walk_file(struct file *file, pgoff_t index,
			      struct hugepoke_file_walk *w, pgoff_t *next)
{
	struct rmap_walk_control rwc = {
		.arg = w,
		.rmap_one = hugepoke_file_vma_one,
		.invalid_vma = hugepoke_not_private_text,
	};
	struct inode *inode = file_inode(file);
	struct folio *folio;

	if (!S_ISREG(inode->i_mode))
		return -EINVAL;
	if (index >= DIV_ROUND_UP(i_size_read(inode), PAGE_SIZE))
		return -ENXIO;
	folio = hugepoke_file_folio(file, index);
	if (IS_ERR(folio))
		return PTR_ERR(folio);
	if (folio_lock_killable(folio)) {
		folio_put(folio);
		return -EINTR;
	}
	/* Truncated since it was read: nothing maps it. */
	if (folio->mapping == file->f_mapping) {
		*next = folio_next_index(folio);
		rmap_walk(folio, &rwc);
	} else {
		*next = index + 1;
	}
	folio_unlock(folio);
	folio_put(folio);
	return w->n;
}

int hugepoke_file_vmas(struct file *file, pgoff_t index,
		       struct hugepoke_file_vma *out, int max, pgoff_t *next)
{
	/* The caller is not patched: it would run the patch it is making. */
	struct hugepoke_file_walk w = { .skip = current->mm, .out = out, .max = max }; /* mutant: file-walk-includes-caller */

	return hugepoke_walk_file(file, index, &w, next);
}

/*
 * As hugepoke_file_vmas(), but only the VMAs of fork @family (a
 * hugepoke_folio_family()) that are not @skip's (NULL: none skipped):
 * where the processes forked from a patched process map the file.
 */
int hugepoke_family_vmas(struct file *file, pgoff_t index, unsigned long family,
			 struct mm_struct *skip, struct hugepoke_file_vma *out,
			 int max, pgoff_t *next)
{
	struct hugepoke_file_walk w = {
		.skip = skip, .family = family, .out = out, .max = max
	};

	return hugepoke_walk_file(file, index, &w, next);
}

/* Pages of the file a VMA maps, to its current size (rounded up). */
pgoff_t hugepoke_vma_file_pages(struct vm_area_struct *vma)
{
	return DIV_ROUND_UP(i_size_read(file_inode(vma->vm_file)), PAGE_SIZE);
}

/*
 * The Rust miscdevice leaves file_operations.owner NULL, so an open file of
 * /dev/hugepoke holds no reference on this module (Rust-for-Linux issue
 * 1182): open() takes one here and release() drops it as its last act.
 */
bool hugepoke_module_get(void)
{
	return try_module_get(THIS_MODULE);
}

void hugepoke_module_put(void)
{
	module_put(THIS_MODULE);
}

/* Trace events: the journal's steps (hugepoke_trace.h). */

#define HUGEPOKE_STEP_ENUM(step) HUGEPOKE_STEP_##step,
enum hugepoke_step { HUGEPOKE_STEPS(HUGEPOKE_STEP_ENUM) HUGEPOKE_STEP_COUNT };

/* Emit step @step's event (a no-op unless it is enabled). */
void hugepoke_trace(unsigned int step, u64 seq, pid_t pid, u64 handle,
		    unsigned long addr, unsigned long pfn, int order, int err,
		    const char *reason, size_t reason_len)
{
#define HUGEPOKE_STEP_TRACE(step)					\
	case HUGEPOKE_STEP_##step:					\
		trace_hugepoke_##step(seq, pid, handle, addr, pfn, order, \
				      err, reason, reason_len);		\
		break;

	switch (step) {
	HUGEPOKE_STEPS(HUGEPOKE_STEP_TRACE)
	default:
		WARN_ONCE(1, "hugepoke: no trace event for step %u\n", step);
	}
#undef HUGEPOKE_STEP_TRACE
}

/* The name of step @step's event, less its "hugepoke_" prefix, or NULL. */
const char *hugepoke_trace_step_name(unsigned int step)
{
#define HUGEPOKE_STEP_NAME(step) [HUGEPOKE_STEP_##step] = #step,
	static const char *const names[HUGEPOKE_STEP_COUNT] = {
		HUGEPOKE_STEPS(HUGEPOKE_STEP_NAME)
	};
#undef HUGEPOKE_STEP_NAME

	return step < HUGEPOKE_STEP_COUNT ? names[step] : NULL;
}
