package dispatch

import (
	"maps"
	"slices"
	"sync"
)

// runSet owns the jobs that live in this process — waiting for a slot,
// being sent, or running — by job id, and the queue numbers given to new
// jobs. A job is in it from its submission (or takeover) until it ends
// here or is let go; while it is, Recover leaves it alone.
type runSet struct {
	mu     sync.Mutex
	byID   map[string]*run
	number float64 // the next job's queue number
}

func newRunSet() *runSet { return &runSet{byID: map[string]*run{}} }

// nextNumber returns the queue number of a new job.
func (s *runSet) nextNumber() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.number
	s.number++
	return n
}

// add puts r in the set unless a run of the same job is there already
// (returned, with false).
func (s *runSet) add(r *run) (other *run, added bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if other, dup := s.byID[r.job.ID]; dup {
		return other, false
	}
	s.byID[r.job.ID] = r
	return r, true
}

// addWithin is add, unless the prompts the user's runs keep here, with
// r's, would take more than limit bytes (limit > 0; a user's only job is
// always taken): then r is not added, other is nil and held is what the
// user's runs keep.
func (s *runSet) addWithin(r *run, limit int64) (other *run, added bool, held int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if other, dup := s.byID[r.job.ID]; dup {
		return other, false, 0
	}
	if limit > 0 {
		for _, o := range s.byID {
			if o.job.User == r.job.User {
				held += promptBytes(o)
			}
		}
		if held > 0 && held+promptBytes(r) > limit {
			return nil, false, held
		}
	}
	s.byID[r.job.ID] = r
	return r, true, 0
}

// promptBytes is what a run keeps of its prompt: the request as it came
// (every top-level value, the UI workflow among them, which the record's
// extra_data shares) and the prompt as recorded; or, for a job taken over,
// its record's.
func promptBytes(r *run) int64 {
	pr := r.req.Request
	if pr == nil {
		return BodySize(r.job)
	}
	n := int64(len(r.job.Prompt))
	for k, v := range pr.Raw {
		n += int64(len(k) + len(v))
	}
	return n
}

// put puts r in the set, in place of any run of the same job.
func (s *runSet) put(r *run) {
	s.mu.Lock()
	s.byID[r.job.ID] = r
	s.mu.Unlock()
}

// remove takes a job's run out of the set.
func (s *runSet) remove(id string) {
	s.mu.Lock()
	delete(s.byID, id)
	s.mu.Unlock()
}

// get returns a job's run.
func (s *runSet) get(id string) (*run, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.byID[id]
	return r, ok
}

// list is a copy of the runs, to walk without holding the set's lock.
func (s *runSet) list() []*run {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Values(s.byID))
}

// runningByUser counts, per user, the pool's jobs that hold or are taking
// an endpoint slot.
func (s *runSet) runningByUser(pool string) map[string]int {
	out := map[string]int{}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.byID {
		if r.job.Pool != pool {
			continue
		}
		r.mu.Lock()
		if r.slot != nil {
			out[r.job.User]++
		}
		r.mu.Unlock()
	}
	return out
}

// Active returns the user's jobs that wait or run in this process.
func (m *Manager) Active(user string) []*Job {
	var runs []*run
	for _, r := range m.runs.list() {
		if r.job.User == user {
			runs = append(runs, r)
		}
	}
	out := make([]*Job, 0, len(runs))
	for _, r := range runs {
		out = append(out, r.snapshot())
	}
	SortJobs(out)
	return out
}
