/* SPDX-License-Identifier: GPL-2.0 */
/*
 * hugepoke's trace events: one per journal step, all of one class, so that
 * each step can be enabled on its own (events/hugepoke/hugepoke_split_pmd)
 * or all at once (events/hugepoke).  The journal emits them (src/journal.rs,
 * through hugepoke_trace() in helpers.c) with the same fields as its debugfs
 * `events` line, seq included, so the two can be matched line by line.
 */
#undef TRACE_SYSTEM
#define TRACE_SYSTEM hugepoke

#if !defined(_HUGEPOKE_TRACE_H) || defined(TRACE_HEADER_MULTI_READ)
#define _HUGEPOKE_TRACE_H

#include <linux/tracepoint.h>

#include "helpers.h"

DECLARE_EVENT_CLASS(hugepoke_step,
	TP_PROTO(u64 seq, pid_t pid, u64 handle, unsigned long addr,
		 unsigned long pfn, int order, int err,
		 const char *reason, size_t reason_len),
	TP_ARGS(seq, pid, handle, addr, pfn, order, err, reason, reason_len),

	TP_STRUCT__entry(
		__field(u64, seq)
		__field(pid_t, pid)
		__field(u64, handle)		/* 0: none */
		__field(unsigned long, addr)	/* 0: none */
		__field(unsigned long, pfn)	/* 0: none */
		__field(int, order)		/* -1: none */
		__field(int, errno)		/* 0 or a negative errno */
		__string_len(reason, reason, reason_len)
	),

	TP_fast_assign(
		__entry->seq = seq;
		__entry->pid = pid;
		__entry->handle = handle;
		__entry->addr = addr;
		__entry->pfn = pfn;
		__entry->order = order;
		__entry->errno = err;
		__assign_str(reason);
	),

	TP_printk("seq=%llu pid=%d handle=%llu addr=%#lx pfn=%#lx order=%d errno=%d reason=%s",
		  __entry->seq, __entry->pid, __entry->handle, __entry->addr,
		  __entry->pfn, __entry->order, __entry->errno, __get_str(reason))
);

#define HUGEPOKE_DEFINE_STEP_EVENT(step)					\
DEFINE_EVENT(hugepoke_step, hugepoke_##step,				\
	TP_PROTO(u64 seq, pid_t pid, u64 handle, unsigned long addr,	\
		 unsigned long pfn, int order, int err,			\
		 const char *reason, size_t reason_len),		\
	TP_ARGS(seq, pid, handle, addr, pfn, order, err, reason, reason_len));

HUGEPOKE_STEPS(HUGEPOKE_DEFINE_STEP_EVENT)

#endif /* _HUGEPOKE_TRACE_H */

/* Out of tree: Kbuild puts this directory on the include path. */
#undef TRACE_INCLUDE_PATH
#undef TRACE_INCLUDE_FILE
#define TRACE_INCLUDE_PATH .
#define TRACE_INCLUDE_FILE hugepoke_trace
#include <trace/define_trace.h>
