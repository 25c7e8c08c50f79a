package relay

import (
	"context"
	"sync"
)

// promptsAtOnce is how many POST /prompt bodies of one user the gateway
// reads and checks at the same time (on this gateway); more wait their
// turn. A body is held in memory while it is read and checked: without
// this, one user's parallel requests (or slow ones that announce a large
// body and trickle it) could hold max_body_size each, as many as they
// open connections.
const promptsAtOnce = 2

// userSlots hands out a few slots per user; a user waiting for one never
// delays another user.
type userSlots struct {
	mu    sync.Mutex
	users map[string]chan struct{}
	held  map[string]int // slots taken or waited for, per user
}

// acquire waits for one of the user's slots (false if ctx ended first);
// release must follow a true.
func (s *userSlots) acquire(ctx context.Context, user string) bool {
	s.mu.Lock()
	if s.users == nil {
		s.users, s.held = map[string]chan struct{}{}, map[string]int{}
	}
	ch, ok := s.users[user]
	if !ok {
		ch = make(chan struct{}, promptsAtOnce)
		s.users[user] = ch
	}
	s.held[user]++
	s.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return true
	case <-ctx.Done():
		s.done(user)
		return false
	}
}

// release gives a slot back.
func (s *userSlots) release(user string) {
	s.mu.Lock()
	ch := s.users[user]
	s.mu.Unlock()
	<-ch
	s.done(user)
}

// done forgets a user nobody holds or waits for a slot of.
func (s *userSlots) done(user string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held[user]--; s.held[user] == 0 {
		delete(s.held, user)
		delete(s.users, user)
	}
}
