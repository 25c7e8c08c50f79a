package usage

import (
	"sort"
	"sync"
	"sync/atomic"
)

// Counts are running totals of one pool (or one user on one pool) on this
// gateway since it started, for Prometheus counters.
type Counts struct {
	Pool, User  string // User is "" for a pool's totals
	GPUSeconds  float64
	WaitSeconds float64
	OutputBytes int64
	// Jobs by outcome, in Outcomes order.
	Jobs [4]uint64
	// Refused prompts over a quota: GPU time, prompts.
	RefusedGPU, RefusedJobs uint64
}

// Counters add up jobs' use per pool, and per user when PerUser is on
// (operators turn it on knowingly: one series per user). Safe for
// concurrent use.
type Counters struct {
	perUser atomic.Bool
	mu      sync.Mutex
	pools   map[string]*Counts
	users   map[[2]string]*Counts
}

// SetPerUser turns per-user totals on or off.
func (c *Counters) SetPerUser(on bool) { c.perUser.Store(on) }

func (c *Counters) entriesLocked(pool, user string) []*Counts {
	if c.pools == nil {
		c.pools, c.users = map[string]*Counts{}, map[[2]string]*Counts{}
	}
	p := c.pools[pool]
	if p == nil {
		p = &Counts{Pool: pool}
		c.pools[pool] = p
	}
	out := []*Counts{p}
	if c.perUser.Load() && user != "" {
		k := [2]string{pool, user}
		u := c.users[k]
		if u == nil {
			u = &Counts{Pool: pool, User: user}
			c.users[k] = u
		}
		out = append(out, u)
	}
	return out
}

// Add counts one job's end.
func (c *Counters) Add(e JobEnd) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.entriesLocked(e.Pool, e.User) {
		n.GPUSeconds += e.GPU.Seconds()
		n.WaitSeconds += e.Wait.Seconds()
		n.OutputBytes += e.OutputBytes
		for i, o := range Outcomes {
			if o == e.Outcome {
				n.Jobs[i]++
			}
		}
	}
}

// Refused counts a prompt refused over a quota of kind (KindGPU, KindJobs).
func (c *Counters) Refused(pool, user, kind string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.entriesLocked(pool, user) {
		if kind == KindJobs {
			n.RefusedJobs++
		} else {
			n.RefusedGPU++
		}
	}
}

// Snapshot returns the pools' totals and, when per-user totals are on, each
// user's, sorted by pool and user.
func (c *Counters) Snapshot() (pools, users []Counts) {
	c.mu.Lock()
	for _, n := range c.pools {
		pools = append(pools, *n)
	}
	if c.perUser.Load() {
		for _, n := range c.users {
			users = append(users, *n)
		}
	}
	c.mu.Unlock()
	less := func(s []Counts) func(a, b int) bool {
		return func(a, b int) bool {
			if s[a].Pool != s[b].Pool {
				return s[a].Pool < s[b].Pool
			}
			return s[a].User < s[b].User
		}
	}
	sort.Slice(pools, less(pools))
	sort.Slice(users, less(users))
	return pools, users
}
