package dispatch

import (
	"context"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/comfyume/comfyume/usage"
)

// Pool is a named set of upstream endpoints that run jobs.
type Pool struct {
	Name      string
	Upstreams []*Upstream
	// MaxQueued limits how many of one user's jobs may wait in this pool
	// (0: no limit); more are refused with ErrQueueFull.
	MaxQueued int
	// MaxRunning limits how many of one user's jobs may run on the pool's
	// endpoints at once (0: no limit).
	MaxRunning int
	// ColdStartTimeout is how long a job is retried while no endpoint
	// accepts it (default DefaultColdStartTimeout); then it fails.
	ColdStartTimeout time.Duration
	// Watchdog ends a sent job that has had no event for this long
	// (0: never).
	Watchdog time.Duration
	// FallbackHome sends a job that no endpoint took within
	// ColdStartTimeout to the user's own ComfyUI instead of failing it.
	FallbackHome bool
	// Quota is each user's daily limit on the pool (zero: none); a site
	// may change it per user (SubmitRequest.Quota).
	Quota usage.Limits

	mu      sync.Mutex
	waiting *fairQueue
	info    *installInfo
	// held are jobs waiting out a cold-start backoff, with their timers.
	held map[*run]*time.Timer
	// downSince is when the pool last had no endpoint up (zero: one is).
	downSince time.Time
}

// queue returns the pool's queue, made on first use. Call with p.mu held.
func (p *Pool) queue() *fairQueue {
	if p.waiting == nil {
		p.waiting = newFairQueue()
	}
	return p.waiting
}

// poolSet owns where jobs can be sent: the configured pools, by name,
// and the users' own ComfyUI servers (homes) that a pool's fallback sends
// jobs to, one upstream per URL. It points to nothing else in the package.
type poolSet struct {
	mu     sync.Mutex
	byName map[string]*Pool
	homes  map[string]*Upstream // fallback targets, by URL
}

func newPoolSet() *poolSet { return &poolSet{byName: map[string]*Pool{}} }

// get returns a pool by name.
func (s *poolSet) get(name string) (*Pool, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.byName[name]
	return p, ok
}

// put adds or replaces a pool and returns the one it replaced (nil: none).
func (s *poolSet) put(p *Pool) (old *Pool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old = s.byName[p.Name]
	s.byName[p.Name] = p
	return old
}

// list is a copy of the pools, to walk without holding the set's lock.
func (s *poolSet) list() []*Pool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Values(s.byName))
}

// upstreams lists every pool's endpoints, then every home.
func (s *poolSet) upstreams() []*Upstream {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ups []*Upstream
	for _, p := range s.byName {
		ups = append(ups, p.Upstreams...)
	}
	for _, h := range s.homes {
		ups = append(ups, h)
	}
	return ups
}

// home returns the upstream for a home URL (one per URL), made on first
// use.
func (s *poolSet) home(base string, logger *zap.Logger) (*Upstream, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if u, ok := s.homes[base]; ok {
		return u, nil
	}
	u, err := NewUpstream(base, UpstreamOptions{Logger: logger})
	if err != nil {
		return nil, err
	}
	if s.homes == nil {
		s.homes = map[string]*Upstream{}
	}
	s.homes[base] = u
	return u, nil
}

// Pool returns a pool by name.
func (m *Manager) Pool(name string) (*Pool, bool) { return m.pools.get(name) }

// PoolNames lists the configured pools.
func (m *Manager) PoolNames() []string {
	var out []string
	for _, p := range m.pools.list() {
		out = append(out, p.Name)
	}
	return out
}

// Quota returns a pool's daily limits, as configured.
func (m *Manager) Quota(pool string) (usage.Limits, bool) {
	p, ok := m.Pool(pool)
	if !ok {
		return usage.Limits{}, false
	}
	return p.Quota, true
}

// acquire takes a slot on the least busy endpoint, or returns nil.
func (p *Pool) acquire() (*Upstream, string) {
	type cand struct {
		u    *Upstream
		load int
	}
	var healthy []cand
	var trial *Upstream
	now := time.Now()
	for _, u := range p.Upstreams {
		u.mu.Lock()
		load := u.inflight
		free := u.MaxJobs <= 0 || load < u.MaxJobs
		ok := u.failures < FailuresToOpen
		due := !ok && !now.Before(u.openUntil)
		u.mu.Unlock()
		if !free {
			continue
		}
		if ok {
			healthy = append(healthy, cand{u, load})
		} else if due && trial == nil {
			trial = u
		}
	}
	sort.SliceStable(healthy, func(a, b int) bool { return healthy[a].load < healthy[b].load })
	for _, c := range healthy {
		if token, ok := c.u.take(""); ok {
			return c.u, token
		}
	}
	if trial != nil {
		// Every free endpoint is down: one whose backoff ran out gets a
		// trial job (the circuit's half-open state).
		if token, ok := trial.take(""); ok {
			trial.mu.Lock()
			trial.openUntil = now.Add(time.Hour) // one trial at a time
			trial.mu.Unlock()
			return trial, token
		}
	}
	return nil, ""
}

// take reserves a slot on the endpoint for a job of user: here, and — when
// gateways share the store — among all of them. The token names the shared
// slot ("" when not shared). A store that cannot be asked does not block
// the job.
func (u *Upstream) take(user string) (string, bool) {
	u.mu.Lock()
	u.inflight++
	shared, max := u.shared, u.MaxJobs
	u.mu.Unlock()
	if shared == nil || max <= 0 {
		return "", true
	}
	token := uuid.NewString() + "|" + user
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ok, err := shared.AcquireSlot(ctx, u.String(), max, token, u.slotTTL)
	if err != nil {
		u.logger.Warn("shared slot count unavailable; counting locally", zap.Error(err))
		return "", true
	}
	if !ok {
		u.release() // another gateway's jobs fill it
		return "", false
	}
	return token, true
}

// giveBack returns a slot taken with take.
func (u *Upstream) giveBack(token string) {
	u.release()
	ss := u.sharedSlots()
	if token == "" || ss == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := ss.ReleaseSlot(ctx, u.String(), token); err != nil {
		u.logger.Warn("releasing shared slot", zap.Error(err))
	}
}

// sharedSlots returns the store that counts slots with other gateways.
func (u *Upstream) sharedSlots() SharedSlots {
	if u == nil {
		return nil
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.shared
}

// release gives back the slot a job held.
func (u *Upstream) release() {
	u.mu.Lock()
	if u.inflight > 0 {
		u.inflight--
	}
	u.mu.Unlock()
}

// endpoint returns the pool's upstream with that address, or nil.
func (p *Pool) endpoint(addr string) *Upstream {
	for _, u := range p.Upstreams {
		if u.String() == addr {
			return u
		}
	}
	return nil
}
