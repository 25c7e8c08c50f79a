package dispatch

import (
	"context"
	"sort"
)

// PoolStatus is a pool as an operator sees it, from this gateway.
type PoolStatus struct {
	Name string `json:"name"`
	// Waiting counts the jobs in the pool's queue — of every gateway when
	// the queue is shared (the Valkey store), else of this one.
	Waiting int `json:"waiting"`
	// Held counts this gateway's jobs waiting out a retry because no
	// endpoint accepted them (a cold start).
	Held int `json:"held"`
	// Running counts this gateway's jobs that hold an endpoint slot.
	Running   int              `json:"running"`
	Endpoints []EndpointStatus `json:"endpoints"`
}

// EndpointStatus is one endpoint of a pool.
type EndpointStatus struct {
	// URL is the endpoint's address, with any password redacted.
	URL string `json:"url"`
	// Up is false while the endpoint's circuit is open (it failed
	// FailuresToOpen times in a row and has not answered since).
	Up bool `json:"up"`
	// Failures in a row, 0 once it answers.
	Failures int `json:"failures"`
	// Jobs of this gateway on the endpoint, and its max_jobs (0: no limit).
	Jobs    int `json:"jobs"`
	MaxJobs int `json:"max_jobs"`
	// Transport is "comfyui", "worker" or "worker-async".
	Transport string `json:"transport"`
}

// Status describes every pool, sorted by name. With a shared queue it
// asks the store for the waiting count (a store that does not answer
// leaves it at 0).
func (m *Manager) Status(ctx context.Context) []PoolStatus { return m.ops.status(ctx) }

// status describes every pool (see Manager.Status).
func (o *opsView) status(ctx context.Context) []PoolStatus {
	pools := o.pools.list()
	sort.Slice(pools, func(a, b int) bool { return pools[a].Name < pools[b].Name })
	out := make([]PoolStatus, 0, len(pools))
	for _, p := range pools {
		ps := PoolStatus{Name: p.Name}
		p.mu.Lock()
		ps.Held = len(p.held)
		if o.queues.shared == nil {
			ps.Waiting = p.queue().len()
		}
		p.mu.Unlock()
		if o.queues.shared != nil {
			names := make([]string, 0, len(p.Upstreams))
			for _, u := range p.Upstreams {
				names = append(names, u.String())
			}
			if st, err := o.queues.shared.QueueState(ctx, p.Name, names); err == nil {
				for _, u := range st.Users {
					ps.Waiting += len(u.Jobs)
				}
			}
		}
		for _, n := range o.runs.runningByUser(p.Name) {
			ps.Running += n
		}
		for _, u := range p.Upstreams {
			u.mu.Lock()
			es := EndpointStatus{URL: u.String(), Up: u.failures < FailuresToOpen, Failures: u.failures, Jobs: u.inflight, MaxJobs: u.MaxJobs, Transport: "comfyui"}
			u.mu.Unlock()
			switch {
			case u.Async:
				es.Transport = "worker-async"
			case u.Pinned:
				es.Transport = "worker"
			}
			ps.Endpoints = append(ps.Endpoints, es)
		}
		out = append(out, ps)
	}
	return out
}
