// Package usage keeps what each person used of the GPU pools — GPU time,
// time spent waiting, jobs by outcome, bytes of outputs — per user, per
// pool and per day (UTC), and enforces daily quotas on it.
//
// A Ledger is the record: MemoryLedger in one process, ValkeyLedger shared
// by every gateway replica (one hash per day, atomic increments, expiring
// after Retention). Jobs are accounted at two lifecycle points only: when
// a prompt is admitted (Admit, which checks the quota and counts the
// admission in one atomic step, so that replicas sharing the ledger cannot
// admit more than the quota between them) and when a job that ran ends
// (Record, idempotent per job). Nothing here runs per event.
//
// Days are UTC calendar days ("2006-01-02"); a job's use counts on the day
// it ended, an admission on the day it was admitted. The package knows
// nothing of Caddy, HTTP handlers or the dispatcher.
package usage
