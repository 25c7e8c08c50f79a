package dispatch

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// savingStore counts the job records written.
type savingStore struct {
	*MemoryStore
	saves atomic.Int64
}

func (s *savingStore) Save(ctx context.Context, j *Job) error {
	s.saves.Add(1)
	return s.MemoryStore.Save(ctx, j)
}

// A GPU server that floods a job it is not keeping busy with executed
// events (outputs that need no capture) does not make the gateway write
// the job's record once per event (20 000 writes of a record of up to
// MaxRecordedOutputs before — with Valkey, a round trip and the record's
// encoding each; max_job_queue bounds events only while the job is busy):
// past eagerSaves, one a second, and the end.
func TestExecutedFloodWritesRecordBoundedTimes(t *testing.T) {
	store := &savingStore{MemoryStore: NewMemoryStore()}
	feed := &browserFeed{release: make(chan struct{}), ended: make(chan struct{})}
	close(feed.release)
	m := NewManager(store, feed, nil)
	r := newRun(m, &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusPending})
	m.runs.put(r)
	r.push(upstreamEvent(t, `{"type":"execution_start","data":{"prompt_id":"job-1","timestamp":1}}`))
	const n = 20000
	for i := 0; i < n; i++ {
		r.push(upstreamEvent(t, fmt.Sprintf(`{"type":"executed","data":{"node":"%d","display_node":"%d","output":{"text":["x"]},"prompt_id":"job-1"}}`, i%7, i%7)))
	}
	r.push(upstreamEvent(t, `{"type":"execution_success","data":{"prompt_id":"job-1","timestamp":2}}`))
	select {
	case <-feed.ended:
	case <-time.After(30 * time.Second):
		t.Fatal("the job never ended")
	}
	if n := store.saves.Load(); n > 1000 {
		t.Fatalf("%d writes of the job's record for one job's events", n)
	}
}

// stallingStore holds the first record written until a second one was
// written (or a second passes): the store answering the first write late,
// as a busy Valkey may.
type stallingStore struct {
	*MemoryStore
	mu      sync.Mutex
	writes  int
	entered chan struct{} // closed when the first write arrives
	second  chan struct{} // closed when a second write is done
}

func (s *stallingStore) Save(ctx context.Context, j *Job) error {
	s.mu.Lock()
	s.writes++
	n := s.writes
	s.mu.Unlock()
	if n == 1 {
		close(s.entered)
		select {
		case <-s.second:
		case <-time.After(time.Second):
		}
		return s.MemoryStore.Save(ctx, j)
	}
	err := s.MemoryStore.Save(ctx, j)
	if n == 2 {
		close(s.second)
	}
	return err
}

// The submit saves the job's record (with its endpoint) while the GPU
// already started it and the job's goroutine saves execution_start: the
// store keeps the newer record whatever order the writes land in. (The
// older one landing last left the record "pending" for the rest of the
// run, so that other replicas listed a running job as waiting and one that
// took it over after this gateway died could send it again.)
func TestOlderRecordNeverOverwritesNewer(t *testing.T) {
	store := &stallingStore{MemoryStore: NewMemoryStore(), entered: make(chan struct{}), second: make(chan struct{})}
	feed := &browserFeed{release: make(chan struct{}), ended: make(chan struct{})}
	close(feed.release)
	m := NewManager(store, feed, nil)
	j := &Job{ID: "job-1", User: "alice", ClientID: "tab", Status: StatusPending}
	if err := store.Create(context.Background(), j.Clone()); err != nil {
		t.Fatal(err)
	}
	r := newRun(m, j)
	m.runs.put(r)
	submitted := make(chan struct{})
	go func() {
		r.save() // as the submit does once the endpoint took the job
		close(submitted)
	}()
	<-store.entered
	r.push(upstreamEvent(t, `{"type":"execution_start","data":{"prompt_id":"job-1","timestamp":1}}`))
	<-submitted
	deadline := time.Now().Add(10 * time.Second)
	for {
		feed.mu.Lock()
		n := len(feed.got)
		feed.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("execution_start never reached the browser")
		}
		time.Sleep(5 * time.Millisecond)
	}
	got, err := store.Job(context.Background(), "job-1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != StatusInProgress {
		t.Fatalf("after the browser saw execution_start the stored job is %q", got.Status)
	}
}
