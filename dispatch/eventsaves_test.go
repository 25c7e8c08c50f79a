package dispatch

import (
	"context"
	"fmt"
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
