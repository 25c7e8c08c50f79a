package dispatch

import (
	"context"
	"sync"
)

// Store keeps job records. The memory store is the embedded default; a
// shared store (Valkey) lets several gateways act as one.
type Store interface {
	// Save inserts or replaces a job record.
	Save(ctx context.Context, j *Job) error
	// Job returns a copy of one record, or ErrNotFound.
	Job(ctx context.Context, id string) (*Job, error)
	// UserJobs returns copies of every record of one user.
	UserJobs(ctx context.Context, user string) ([]*Job, error)
	// Delete removes a record.
	Delete(ctx context.Context, id string) error
}

// MemoryStore keeps records in this process. Safe for concurrent use.
type MemoryStore struct {
	mu     sync.RWMutex
	jobs   map[string]*Job
	byUser map[string]map[string]struct{}
}

// NewMemoryStore returns an empty store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{jobs: map[string]*Job{}, byUser: map[string]map[string]struct{}{}}
}

// Save implements Store.
func (s *MemoryStore) Save(_ context.Context, j *Job) error {
	c := j.Clone()
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.jobs[j.ID]; ok && old.User != j.User {
		delete(s.byUser[old.User], j.ID)
	}
	s.jobs[j.ID] = c
	ids := s.byUser[j.User]
	if ids == nil {
		ids = map[string]struct{}{}
		s.byUser[j.User] = ids
	}
	ids[j.ID] = struct{}{}
	return nil
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

// Delete implements Store.
func (s *MemoryStore) Delete(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if j, ok := s.jobs[id]; ok {
		delete(s.byUser[j.User], id)
		delete(s.jobs, id)
	}
	return nil
}
