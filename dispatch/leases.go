package dispatch

import (
	"context"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// DefaultLeaseTTL is how long a gateway's claim on a job lasts without
// renewal. A gateway that dies stops renewing; after this another gateway
// sharing the store takes its jobs over.
const DefaultLeaseTTL = 15 * time.Second

// leases owns this gateway's claims on jobs in the store: the name it
// claims them as (owner), how long a claim lasts, and the jobs it ended
// lately, which Recover must not take for jobs nobody follows while their
// records lag behind. It points down to the Store only.
type leases struct {
	store  Store
	logger *zap.Logger
	owner  string
	ttl    time.Duration // set before Start (SetLeaseTTL)

	mu    sync.Mutex
	ended map[string]endedJob
}

func newLeases(store Store, logger *zap.Logger) *leases {
	return &leases{store: store, logger: logger, owner: newOwner(), ttl: DefaultLeaseTTL}
}

// owner names this gateway process in job leases.
func newOwner() string {
	host, _ := os.Hostname()
	return host + "/" + strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
}

// SetLeaseTTL changes how long job leases last (see DefaultLeaseTTL). Call
// it before Start.
func (m *Manager) SetLeaseTTL(d time.Duration) {
	if d > 0 {
		m.leases.ttl = d
	}
}

func (l *leases) claim(ctx context.Context, id string) bool {
	ok, err := l.store.Claim(ctx, id, l.owner, l.ttl)
	if err != nil {
		l.logger.Warn("claiming job", zap.String("job", id), zap.Error(err))
	}
	return ok && err == nil
}

// renew extends the claim on a job; false without an error means another
// gateway holds it.
func (l *leases) renew(ctx context.Context, id string) (bool, error) {
	return l.store.Claim(ctx, id, l.owner, l.ttl)
}

// unclaim gives a lease up at once (by letting it expire now).
func (l *leases) unclaim(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, _ = l.store.Claim(ctx, id, l.owner, time.Millisecond)
}

// endedMemory is how long this gateway remembers the jobs it ended, to
// tell them from jobs nobody follows when their records lag behind.
func (l *leases) endedMemory() time.Duration { return 4 * l.ttl }

// endedJob is the final state of a job this gateway ended (nil: the job was
// dropped, its record deleted).
type endedJob struct {
	at  time.Time
	job *Job
}

// rememberEnded notes that this gateway ended a job (final is its last
// state, without the prompt; nil for a job that was dropped).
func (l *leases) rememberEnded(id string, final *Job) {
	l.mu.Lock()
	if l.ended == nil {
		l.ended = map[string]endedJob{}
	}
	l.ended[id] = endedJob{at: time.Now(), job: final}
	l.mu.Unlock()
}

// endedHere returns the end of a job this gateway ended lately.
func (l *leases) endedHere(id string) (endedJob, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.ended[id]
	return e, ok
}

func (l *leases) forgetEnded(now time.Time) {
	keep := l.endedMemory()
	l.mu.Lock()
	for id, e := range l.ended {
		if now.Sub(e.at) > keep {
			delete(l.ended, id)
		}
	}
	l.mu.Unlock()
}

// repairEnded writes again the end of a job this gateway ended but whose
// record still says it waits or runs (the store missed the final write).
func (l *leases) repairEnded(ctx context.Context, id string, e endedJob) {
	var err error
	if e.job == nil {
		err = l.store.Delete(ctx, id)
	} else {
		err = l.store.Save(ctx, e.job)
	}
	if err != nil {
		l.logger.Warn("writing the end of a job again", zap.String("job", id), zap.Error(err))
	}
}

// adoptedStreams owns the event streams this gateway opened for jobs it
// took over from another gateway, by upstream and the sid they listen as:
// several such jobs on one sid share a stream, which closes with the last
// of them.
type adoptedStreams struct {
	mu    sync.Mutex
	byKey map[streamKey]*Upstream
}

// streamKey names an event stream: an upstream and the sid it listens as.
type streamKey struct{ upstream, sid string }

// addLocked keeps a stream opened for jobs taken over. Call with s.mu
// held.
func (s *adoptedStreams) addLocked(up *Upstream) {
	if s.byKey == nil {
		s.byKey = map[streamKey]*Upstream{}
	}
	s.byKey[streamKey{up.String(), up.clientID}] = up
}

// release closes a stream opened for jobs taken over once no job is
// routed on it. Streams the process uses otherwise are left alone.
func (s *adoptedStreams) release(up *Upstream) {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := streamKey{up.String(), up.clientID}
	if s.byKey[key] != up {
		return
	}
	up.mu.Lock()
	idle := len(up.routes) == 0
	up.mu.Unlock()
	if idle {
		delete(s.byKey, key)
		up.Close()
	}
}
