package dispatch

import (
	"context"
	"slices"
	"sort"
	"sync"
	"time"
)

// Store keeps job records. The memory store is the embedded default; a
// shared store (Valkey) lets several gateways act as one.
type Store interface {
	// Save inserts or replaces a job record. A record without Prompt and
	// ExtraData (a summary) keeps the stored ones: they never change once
	// the job is made. A job that ended stays ended: saving a waiting or
	// running state over an ended record (a late write of an older state,
	// racing the job's end) changes nothing, so that no gateway ever sees
	// the job as active again and takes it over.
	Save(ctx context.Context, j *Job) error
	// Job returns a copy of one record, or ErrNotFound.
	Job(ctx context.Context, id string) (*Job, error)
	// JobSummary is Job without Prompt and ExtraData (for checks of owner
	// or state, such as every /view of an output).
	JobSummary(ctx context.Context, id string) (*Job, error)
	// UserJobs returns copies of every record of one user.
	UserJobs(ctx context.Context, user string) ([]*Job, error)
	// UserJobSummaries is UserJobs without each record's Prompt and
	// ExtraData — the UI workflow, often megabytes — for lists that do not
	// show them (the jobs panel is read after every queue change).
	UserJobSummaries(ctx context.Context, user string) ([]*Job, error)
	// Delete removes a record.
	Delete(ctx context.Context, id string) error
	// Create saves a new record only if no record has its ID; otherwise it
	// returns ErrExists and changes nothing (idempotent submission).
	Create(ctx context.Context, j *Job) error
	// ActiveJobs returns summaries (records without Prompt and ExtraData)
	// of every user's jobs whose status is pending or in_progress (for
	// recovery after a restart; read the full record with Job).
	ActiveJobs(ctx context.Context) ([]*Job, error)
	// ActiveCount counts one user's pending and in_progress jobs without
	// reading the records (the queue count browsers are shown often).
	ActiveCount(ctx context.Context, user string) (int, error)
	// Trim forgets the user's oldest ended jobs (in UserJobs order) beyond
	// the newest keep ended ones, and beyond the newest ones whose bodies
	// (Prompt and ExtraData, see BodySize) fit in budget bytes together (0:
	// no budget; the newest ended job is always kept), and returns their
	// ids. Waiting and running jobs are never trimmed.
	Trim(ctx context.Context, user string, keep int, budget int64) ([]string, error)
	// Claim gives owner the lease on a job for ttl if nobody else holds a
	// live one (or owner already does: then it is renewed). It reports
	// whether owner holds the lease afterwards. Gateways sharing a store use
	// it so that exactly one follows each running job.
	Claim(ctx context.Context, id, owner string, ttl time.Duration) (bool, error)
}

// SharedSlots is implemented by stores that several gateways share: they
// count the jobs on each endpoint together, so that gateways never put more
// than an endpoint's max_jobs on it between them. A slot is held by a token
// until released, or until it expires without renewal (a dead gateway).
type SharedSlots interface {
	AcquireSlot(ctx context.Context, endpoint string, max int, token string, ttl time.Duration) (bool, error)
	RenewSlot(ctx context.Context, endpoint, token string, ttl time.Duration) error
	ReleaseSlot(ctx context.Context, endpoint, token string) error
}

// ErrExists is returned by Create for an ID that is taken.
const ErrExists = dispatchError("dispatch: job exists")

// MemoryStore keeps records in this process. Safe for concurrent use.
type MemoryStore struct {
	mu     sync.RWMutex
	jobs   map[string]*Job
	byUser map[string]map[string]struct{}
	leases map[string]lease
	// bodies is each user's total BodySize (every job of theirs).
	bodies map[string]int64
	// active counts each user's waiting and running jobs (ActiveCount is
	// asked at every queue change of theirs: counting their records then
	// cost as much as their history is long).
	active map[string]int
	// outputs is each user's total StoredBytes of ended jobs
	// (EndedOutputBytes: asked at the end of every job with outputs).
	outputs map[string]int64
	// installs are the pools' last known installs (see InstallStore).
	installs installs
}

// BodySize is the size of a job record's body, its Prompt and ExtraData
// (the UI workflow): what a store keeps per job beyond a small summary.
func BodySize(j *Job) int64 {
	n := int64(len(j.Prompt))
	for k, v := range j.ExtraData {
		n += int64(len(k) + len(v))
	}
	return n
}

type lease struct {
	owner string
	until time.Time
}

// NewMemoryStore returns an empty store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{jobs: map[string]*Job{}, byUser: map[string]map[string]struct{}{}, leases: map[string]lease{}, bodies: map[string]int64{}, active: map[string]int{}, outputs: map[string]int64{}}
}

// Create implements Store.
func (s *MemoryStore) Create(_ context.Context, j *Job) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, taken := s.jobs[j.ID]; taken {
		return ErrExists
	}
	s.saveLocked(j.Clone())
	return nil
}

// ActiveJobs implements Store.
func (s *MemoryStore) ActiveJobs(_ context.Context) ([]*Job, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*Job
	for _, j := range s.jobs {
		if j.Active() {
			out = append(out, j.Summary())
		}
	}
	SortJobs(out)
	return out, nil
}

// ActiveCount implements Store.
func (s *MemoryStore) ActiveCount(_ context.Context, user string) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.active[user], nil
}

// EndedOutputBytes reports the total StoredBytes of the user's ended jobs,
// kept as records change: what the outputs budget of a user's history
// bounds (Manager.SetHistoryOutputs), known without reading their jobs.
func (s *MemoryStore) EndedOutputBytes(_ context.Context, user string) (int64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.outputs[user], nil
}

// countLocked adds (d = 1) or takes away (d = -1) what a record counts
// for in the user's totals: its body, and whether it is active or its
// stored outputs once ended.
func (s *MemoryStore) countLocked(j *Job, d int) {
	s.bodies[j.User] += int64(d) * BodySize(j)
	if j.Active() {
		s.countActiveLocked(j.User, d)
	} else if j.StoredBytes != 0 {
		if n := s.outputs[j.User] + int64(d)*j.StoredBytes; n != 0 {
			s.outputs[j.User] = n
		} else {
			delete(s.outputs, j.User)
		}
	}
}

// countActiveLocked adds d to the user's count of active jobs.
func (s *MemoryStore) countActiveLocked(user string, d int) {
	if n := s.active[user] + d; n > 0 {
		s.active[user] = n
	} else {
		delete(s.active, user)
	}
}

// Claim implements Store.
func (s *MemoryStore) Claim(_ context.Context, id, owner string, ttl time.Duration) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if l, ok := s.leases[id]; ok && l.owner != owner && now.Before(l.until) {
		return false, nil
	}
	s.leases[id] = lease{owner: owner, until: now.Add(ttl)}
	return true, nil
}

// Save implements Store.
func (s *MemoryStore) Save(_ context.Context, j *Job) error {
	c := j.Clone()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.saveLocked(c)
	return nil
}

func (s *MemoryStore) saveLocked(c *Job) {
	j := c
	if old, ok := s.jobs[j.ID]; ok {
		if !old.Active() && j.Active() {
			return // ended for good (see Store.Save)
		}
		if old.User != j.User {
			delete(s.byUser[old.User], j.ID)
		}
		if len(j.Prompt) == 0 && j.ExtraData == nil {
			j.Prompt, j.ExtraData = old.Prompt, old.ExtraData
		}
		s.countLocked(old, -1)
	}
	s.countLocked(j, 1)
	s.jobs[j.ID] = c
	ids := s.byUser[j.User]
	if ids == nil {
		ids = map[string]struct{}{}
		s.byUser[j.User] = ids
	}
	ids[j.ID] = struct{}{}
}

// Job implements Store.
func (s *MemoryStore) Job(_ context.Context, id string) (*Job, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	j, ok := s.jobs[id]
	if !ok {
		return nil, ErrNotFound
	}
	return j.Clone(), nil
}

// JobSummary implements Store.
func (s *MemoryStore) JobSummary(_ context.Context, id string) (*Job, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	j, ok := s.jobs[id]
	if !ok {
		return nil, ErrNotFound
	}
	return j.Summary(), nil
}

// UserJobs implements Store.
func (s *MemoryStore) UserJobs(_ context.Context, user string) ([]*Job, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Job, 0, len(s.byUser[user]))
	for id := range s.byUser[user] {
		out = append(out, s.jobs[id].Clone())
	}
	SortJobs(out)
	return out, nil
}

// UserJobSummaries implements Store.
func (s *MemoryStore) UserJobSummaries(_ context.Context, user string) ([]*Job, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Job, 0, len(s.byUser[user]))
	for id := range s.byUser[user] {
		out = append(out, s.jobs[id].Summary())
	}
	SortJobs(out)
	return out, nil
}

// Trim implements Store.
func (s *MemoryStore) Trim(_ context.Context, user string, keep int, budget int64) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.byUser[user]) <= keep && (budget <= 0 || s.bodies[user] <= budget) {
		return nil, nil // fewer jobs and bytes than kept: nothing to look at
	}
	var ended []*Job
	for id := range s.byUser[user] {
		if j := s.jobs[id]; !j.Active() {
			ended = append(ended, j)
		}
	}
	var forget []*Job
	if k := len(ended) - keep; k > 0 && k <= 64 && (budget <= 0 || s.bodies[user] <= budget) {
		// Over the count only, by a few: at the history limit, every
		// job that ends makes one more to forget. The oldest few are
		// picked out of the history, not found by sorting it all.
		forget = oldestJobs(ended, k)
	} else {
		SortJobs(ended)
		forget = ended[:len(ended)-keepEnded(ended, keep, budget)]
	}
	var gone []string
	for _, j := range forget {
		delete(s.byUser[user], j.ID)
		delete(s.jobs, j.ID)
		delete(s.leases, j.ID)
		s.countLocked(j, -1)
		gone = append(gone, j.ID)
	}
	return gone, nil
}

// oldestJobs returns the k oldest of jobs (k > 0), oldest first: what
// SortJobs would put first, in one pass over jobs that keeps the k oldest
// seen so far.
func oldestJobs(jobs []*Job, k int) []*Job {
	out := make([]*Job, 0, k+1)
	for _, j := range jobs {
		if len(out) == k && !jobBefore(j, out[k-1]) {
			continue
		}
		i := sort.Search(len(out), func(i int) bool { return jobBefore(j, out[i]) })
		out = slices.Insert(out, i, j)
		if len(out) > k {
			out = out[:k]
		}
	}
	return out
}

// keepEnded is how many of the newest ended jobs (sorted oldest first)
// Trim keeps: at most keep, and (budget > 0) as many as fit in budget
// bytes of BodySize together, but at least the newest one.
func keepEnded(ended []*Job, keep int, budget int64) int {
	n := min(len(ended), keep)
	if budget <= 0 {
		return n
	}
	var sum int64
	for i := 0; i < n; i++ {
		sum += BodySize(ended[len(ended)-1-i])
		if sum > budget && i > 0 {
			return i
		}
	}
	return n
}

// Delete implements Store.
func (s *MemoryStore) Delete(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if j, ok := s.jobs[id]; ok {
		delete(s.byUser[j.User], id)
		delete(s.jobs, id)
		s.countLocked(j, -1)
	}
	delete(s.leases, id)
	return nil
}
