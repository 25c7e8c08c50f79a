package dispatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valkey-io/valkey-go"
)

// The Store conformance suite runs for every implementation: MemoryStore
// always, ValkeyStore when COMFYUME_TEST_VALKEY names a server (host:port,
// or a valkey:// URL). scripts/services/valkey.sh starts one.

func TestMemoryStore(t *testing.T) {
	testStore(t, func(t *testing.T) Store { return NewMemoryStore() })
}

func TestValkeyStore(t *testing.T) {
	client := testValkeyClient(t, testValkeyAddr(t))
	prefix := testValkeyPrefix(t, client)
	var n atomic.Int64
	testStore(t, func(t *testing.T) Store {
		return NewValkeyStore(client, fmt.Sprintf("%s%d:", prefix, n.Add(1)))
	})
}

// testStore checks that the stores made by newStore (a new, empty one per
// call) behave as the Store interface says.
func testStore(t *testing.T, newStore func(t *testing.T) Store) {
	ctx := context.Background()

	t.Run("RoundTrip", func(t *testing.T) {
		s := newStore(t)
		want := storeTestJob("j1", "alice", 7.5)
		orig := want.Clone()
		if err := s.Save(ctx, orig); err != nil {
			t.Fatal(err)
		}
		// The store keeps its own copy.
		orig.Outputs["9"] = json.RawMessage(`{"images":[]}`)
		orig.Messages[0].Type = "changed"
		orig.Status = StatusFailed
		got, err := s.Job(ctx, "j1")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, got, want)
		// ...and hands out copies.
		got.Outputs["9"] = json.RawMessage(`{}`)
		got.ExtraData["x"] = json.RawMessage(`1`)
		got.Messages[0].Type = "changed"
		again, err := s.Job(ctx, "j1")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, again, want)

		// Save replaces.
		want.Status = StatusCompleted
		want.EndTime = want.StartTime + 5000
		want.Outputs["12"] = json.RawMessage(`{"images":[{"filename":"b.png","subfolder":"","type":"output"}]}`)
		want.Messages = append(want.Messages, HistoryMessage{Type: "execution_success", Data: json.RawMessage(`{"prompt_id":"j1","timestamp":1700000005000}`)})
		if err := s.Save(ctx, want); err != nil {
			t.Fatal(err)
		}
		got, err = s.Job(ctx, "j1")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, got, want)

		if _, err := s.Job(ctx, "nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Job(missing) = %v, want ErrNotFound", err)
		}
	})

	t.Run("UserJobsIsolationAndOrder", func(t *testing.T) {
		s := newStore(t)
		for _, j := range []*Job{
			storeTestJob("a3", "alice", 3),
			storeTestJob("a1", "alice", 1),
			storeTestJob("a2", "alice", 2),
			storeTestJob("afront", "alice", -4),
			storeTestJob("a0", "alice", 1), // same number: by id
			storeTestJob("b1", "bob", 1),
			storeTestJob("b2", "bob", 0),
			storeTestJob("ax1", "alice:x", 1), // a user name that extends another
		} {
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
		}
		storeWantIDs(t, s, "alice", "afront", "a0", "a1", "a2", "a3")
		storeWantIDs(t, s, "bob", "b2", "b1")
		storeWantIDs(t, s, "alice:x", "ax1")
		storeWantIDs(t, s, "carol")

		// The listed records are whole.
		list, err := s.UserJobs(ctx, "bob")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, list[0], storeTestJob("b2", "bob", 0))

		// One summary: the record without the body.
		one, err := s.JobSummary(ctx, "b2")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, one, storeTestJob("b2", "bob", 0).Summary())
		if _, err := s.JobSummary(ctx, "nope"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("JobSummary(missing) = %v", err)
		}

		// Summaries: the same records, same order, without the body.
		sums, err := s.UserJobSummaries(ctx, "bob")
		if err != nil || len(sums) != 2 {
			t.Fatalf("summaries: %v %v", sums, err)
		}
		storeSameJob(t, sums[0], storeTestJob("b2", "bob", 0).Summary())
		if sums[0].Prompt != nil || sums[0].ExtraData != nil {
			t.Fatalf("summary with a body: %s %v", sums[0].Prompt, sums[0].ExtraData)
		}
		// Saving a summary (a state change) keeps the stored body.
		sums[0].Status = StatusCompleted
		if err := s.Save(ctx, sums[0]); err != nil {
			t.Fatal(err)
		}
		full, err := s.Job(ctx, "b2")
		if err != nil {
			t.Fatal(err)
		}
		want := storeTestJob("b2", "bob", 0)
		want.Status = StatusCompleted
		storeSameJob(t, full, want)

		// A record that changes hands leaves its former owner's list.
		moved := storeTestJob("a2", "bob", 2)
		if err := s.Save(ctx, moved); err != nil {
			t.Fatal(err)
		}
		storeWantIDs(t, s, "alice", "afront", "a0", "a1", "a3")
		storeWantIDs(t, s, "bob", "b2", "b1", "a2")
		// A new number re-sorts.
		renumbered := storeTestJob("a3", "alice", -10)
		if err := s.Save(ctx, renumbered); err != nil {
			t.Fatal(err)
		}
		storeWantIDs(t, s, "alice", "a3", "afront", "a0", "a1")
	})

	t.Run("Delete", func(t *testing.T) {
		s := newStore(t)
		for _, j := range []*Job{storeTestJob("d1", "alice", 1), storeTestJob("d2", "alice", 2)} {
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
		}
		if ok, err := s.Claim(ctx, "d1", "gw-a", time.Minute); err != nil || !ok {
			t.Fatalf("Claim = %v, %v", ok, err)
		}
		if err := s.Delete(ctx, "d1"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Job(ctx, "d1"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Job after Delete = %v, want ErrNotFound", err)
		}
		storeWantIDs(t, s, "alice", "d2")
		storeWantActive(t, s, "d2")
		// Its lease went with it.
		if ok, err := s.Claim(ctx, "d1", "gw-b", time.Minute); err != nil || !ok {
			t.Fatalf("Claim after Delete = %v, %v; want the lease free", ok, err)
		}
		// Deleting what is not there is no error.
		if err := s.Delete(ctx, "d1"); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, "never"); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, "d2"); err != nil {
			t.Fatal(err)
		}
		storeWantIDs(t, s, "alice")
		storeWantActive(t, s)
	})

	t.Run("Create", func(t *testing.T) {
		s := newStore(t)
		first := storeTestJob("c1", "alice", 1)
		first.Status = StatusPending
		if err := s.Create(ctx, first); err != nil {
			t.Fatal(err)
		}
		second := storeTestJob("c1", "mallory", 99)
		second.ClientID = "other"
		if err := s.Create(ctx, second); !errors.Is(err, ErrExists) {
			t.Fatalf("second Create = %v, want ErrExists", err)
		}
		got, err := s.Job(ctx, "c1")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, got, first)
		storeWantIDs(t, s, "alice", "c1")
		storeWantIDs(t, s, "mallory")
		storeWantActive(t, s, "c1")

		// Once deleted, the id can be created again.
		if err := s.Delete(ctx, "c1"); err != nil {
			t.Fatal(err)
		}
		if err := s.Create(ctx, second); err != nil {
			t.Fatalf("Create after Delete = %v", err)
		}
		storeWantIDs(t, s, "mallory", "c1")
	})

	t.Run("CreateConcurrent", func(t *testing.T) {
		s := newStore(t)
		const rounds, racers = 5, 16
		for r := range rounds {
			id := fmt.Sprintf("race-%d", r)
			errs := make([]error, racers)
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range racers {
				wg.Go(func() {
					j := storeTestJob(id, fmt.Sprintf("user-%d-%d", r, i), float64(i))
					j.ClientID = fmt.Sprintf("client-%d", i)
					<-start
					errs[i] = s.Create(ctx, j)
				})
			}
			close(start)
			wg.Wait()
			winner := -1
			for i, err := range errs {
				switch {
				case err == nil && winner >= 0:
					t.Fatalf("%s: Creates %d and %d both won", id, winner, i)
				case err == nil:
					winner = i
				case !errors.Is(err, ErrExists):
					t.Fatalf("%s: Create %d = %v", id, i, err)
				}
			}
			if winner < 0 {
				t.Fatalf("%s: no Create won", id)
			}
			got, err := s.Job(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if got.ClientID != fmt.Sprintf("client-%d", winner) || got.User != fmt.Sprintf("user-%d-%d", r, winner) {
				t.Fatalf("%s: stored %s/%s, but Create %d won", id, got.User, got.ClientID, winner)
			}
			for i := range racers {
				want := 0
				if i == winner {
					want = 1
				}
				if list, err := s.UserJobs(ctx, fmt.Sprintf("user-%d-%d", r, i)); err != nil || len(list) != want {
					t.Fatalf("%s: user-%d-%d lists %d jobs (%v), want %d", id, r, i, len(list), err, want)
				}
			}
		}
	})

	t.Run("Trim", func(t *testing.T) {
		s := newStore(t)
		for i, id := range []string{"t1", "t2", "t3", "t4"} {
			j := storeTestJob(id, "alice", float64(i+1))
			j.Status = StatusCompleted
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
		}
		waiting := storeTestJob("t0", "alice", 0)
		waiting.Status = StatusPending
		bobs := storeTestJob("b1", "bob", 0)
		bobs.Status = StatusFailed
		for _, j := range []*Job{waiting, bobs} {
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
		}
		gone, err := s.Trim(ctx, "alice", 2, 0)
		if err != nil || fmt.Sprint(gone) != "[t1 t2]" {
			t.Fatalf("Trim(alice, 2) = %v %v, want the two oldest ended", gone, err)
		}
		storeWantIDs(t, s, "alice", "t0", "t3", "t4")
		storeWantIDs(t, s, "bob", "b1")
		if _, err := s.Job(ctx, "t1"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("trimmed job still readable: %v", err)
		}
		if gone, err := s.Trim(ctx, "alice", 2, 0); err != nil || len(gone) != 0 {
			t.Fatalf("second Trim: %v %v", gone, err)
		}
		if gone, err := s.Trim(ctx, "alice", 0, 0); err != nil || fmt.Sprint(gone) != "[t3 t4]" {
			t.Fatalf("Trim(alice, 0) = %v %v", gone, err)
		}
		storeWantIDs(t, s, "alice", "t0") // the waiting job stays
		storeWantActive(t, s, "t0")
	})

	t.Run("TrimBudget", func(t *testing.T) {
		s := newStore(t)
		big := json.RawMessage(`{"1":{"class_type":"X","inputs":{"text":"` + strings.Repeat("x", 1000) + `"}}}`)
		for i, id := range []string{"t1", "t2", "t3", "t4"} {
			j := storeTestJob(id, "alice", float64(i+1))
			j.Status, j.Prompt, j.ExtraData = StatusCompleted, big, nil
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
			// Later saves (summaries) keep the body and its size.
			if err := s.Save(ctx, j.Summary()); err != nil {
				t.Fatal(err)
			}
		}
		waiting := storeTestJob("t0", "alice", 0)
		waiting.Status, waiting.Prompt = StatusPending, big
		if err := s.Save(ctx, waiting); err != nil {
			t.Fatal(err)
		}
		// Two bodies fit in 2500 bytes, three do not.
		gone, err := s.Trim(ctx, "alice", 100, 2500)
		if err != nil || fmt.Sprint(gone) != "[t1 t2]" {
			t.Fatalf("Trim(alice, 100, 2500) = %v %v, want the two oldest ended", gone, err)
		}
		storeWantIDs(t, s, "alice", "t0", "t3", "t4")
		// The newest ended job stays, however small the budget.
		if gone, err := s.Trim(ctx, "alice", 100, 1); err != nil || fmt.Sprint(gone) != "[t3]" {
			t.Fatalf("Trim(alice, 100, 1) = %v %v", gone, err)
		}
		storeWantIDs(t, s, "alice", "t0", "t4")
	})

	t.Run("ActiveJobs", func(t *testing.T) {
		s := newStore(t)
		j1 := storeTestJob("x1", "alice", 2)
		j1.Status = StatusPending
		j2 := storeTestJob("x2", "bob", 1)
		j2.Status = StatusPending
		j3 := storeTestJob("x3", "alice", 0)
		j3.Status = StatusCompleted
		for _, j := range []*Job{j1, j2, j3} {
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
		}
		storeWantActive(t, s, "x2", "x1")
		storeWantCount(t, s, "alice", 1)
		storeWantCount(t, s, "bob", 1)
		storeWantCount(t, s, "carol", 0)

		j1.Status = StatusInProgress
		if err := s.Save(ctx, j1); err != nil {
			t.Fatal(err)
		}
		active := storeWantActive(t, s, "x2", "x1")
		storeSameJob(t, active[1], j1.Summary()) // without the body

		j1.Status = StatusCompleted
		if err := s.Save(ctx, j1); err != nil {
			t.Fatal(err)
		}
		storeWantActive(t, s, "x2")
		storeWantCount(t, s, "alice", 0)

		for i, st := range []string{StatusFailed, StatusCancelled} {
			j := storeTestJob(fmt.Sprintf("x%d", 4+i), "bob", float64(3+i))
			j.Status = StatusInProgress
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
			storeWantActive(t, s, "x2", j.ID)
			j.Status = st
			if err := s.Save(ctx, j); err != nil {
				t.Fatal(err)
			}
			storeWantActive(t, s, "x2")
		}
		j2.Status = StatusCompleted
		if err := s.Save(ctx, j2); err != nil {
			t.Fatal(err)
		}
		storeWantActive(t, s)

		// An older state saved late does not make an ended job active again.
		j3.Status = StatusPending
		if err := s.Save(ctx, j3); err != nil {
			t.Fatal(err)
		}
		storeWantActive(t, s)
		storeWantCount(t, s, "alice", 0)
		storeWantCount(t, s, "bob", 0)
		// A deleted job no longer counts.
		j6 := storeTestJob("x6", "carol", 6)
		j6.Status = StatusPending
		if err := s.Save(ctx, j6); err != nil {
			t.Fatal(err)
		}
		storeWantCount(t, s, "carol", 1)
		if err := s.Save(ctx, j6); err != nil { // saved again, still one job
			t.Fatal(err)
		}
		storeWantCount(t, s, "carol", 1)
		if err := s.Delete(ctx, "x6"); err != nil {
			t.Fatal(err)
		}
		storeWantCount(t, s, "carol", 0)
		// The user indexes are untouched by all this.
		storeWantIDs(t, s, "alice", "x3", "x1")
		storeWantIDs(t, s, "bob", "x2", "x4", "x5")
	})

	t.Run("Claim", func(t *testing.T) {
		s := newStore(t)
		claim := func(id, owner string, ttl time.Duration, want bool) {
			t.Helper()
			ok, err := s.Claim(ctx, id, owner, ttl)
			if err != nil {
				t.Fatal(err)
			}
			if ok != want {
				t.Fatalf("Claim(%s, %s) = %v, want %v", id, owner, ok, want)
			}
		}
		const ttl = 50 * time.Millisecond
		claim("l1", "gw-a", ttl, true)
		claim("l1", "gw-b", ttl, false) // live lease of another
		claim("l1", "gw-a", ttl, true)  // renewal
		claim("l2", "gw-b", ttl, true)  // leases are per job
		time.Sleep(2 * ttl)
		claim("l1", "gw-b", ttl, true) // expired: free
		claim("l1", "gw-a", ttl, false)

		// A renewal extends the lease from the time of renewal.
		const long = 400 * time.Millisecond
		claim("l3", "gw-a", long, true)
		time.Sleep(long * 5 / 8)
		claim("l3", "gw-a", long, true)
		time.Sleep(long * 5 / 8) // past the first lease's end
		claim("l3", "gw-b", long, false)
	})

	// A job's sender saves its "sent" state while the job's events end it:
	// when the older state lands last, the job stays ended (else it would
	// show as running forever and be taken over as if its gateway died).
	t.Run("EndedStaysEnded", func(t *testing.T) {
		s := newStore(t)
		j := storeTestJob("e1", "alice", 1)
		j.Status = StatusPending
		if err := s.Create(ctx, j); err != nil {
			t.Fatal(err)
		}
		late := j.Summary()
		late.Status = StatusInProgress
		ended := j.Summary()
		ended.Status = StatusCompleted
		if err := s.Save(ctx, ended); err != nil {
			t.Fatal(err)
		}
		if err := s.Save(ctx, late); err != nil {
			t.Fatal(err)
		}
		got, err := s.Job(ctx, "e1")
		if err != nil {
			t.Fatal(err)
		}
		if got.Status != StatusCompleted {
			t.Fatalf("after a late in_progress save: %s, want completed", got.Status)
		}
		if active := storeMustJobs(t)(s.ActiveJobs(ctx)); len(active) != 0 {
			t.Fatalf("ended job listed as active: %v", storeIDs(active))
		}
		if n, err := s.ActiveCount(ctx, "alice"); err != nil || n != 0 {
			t.Fatalf("ActiveCount = %d, %v; want 0", n, err)
		}
	})

	t.Run("ConcurrentSaves", func(t *testing.T) {
		s := newStore(t)
		const users, workers, perWorker = 4, 16, 8
		var wg sync.WaitGroup
		errc := make(chan error, workers*perWorker*4+64)
		for w := range workers {
			wg.Go(func() {
				user := fmt.Sprintf("u%d", w%users)
				for k := range perWorker {
					id := fmt.Sprintf("w%d-%d", w, k)
					j := storeTestJob(id, user, float64(w*perWorker+k))
					j.Status = StatusPending
					steps := []string{StatusPending, StatusInProgress, StatusCompleted}
					if k%2 == 1 {
						steps = steps[:2] // odd jobs stay in progress
					}
					for _, st := range steps {
						j.Status = st
						if err := s.Save(ctx, j); err != nil {
							errc <- err
							return
						}
					}
					if _, err := s.UserJobs(ctx, user); err != nil {
						errc <- err
					}
					if _, err := s.ActiveJobs(ctx); err != nil {
						errc <- err
					}
				}
			})
		}
		// Several writers on one record: the last write wins whole.
		shared := storeTestJob("shared", "u0", -1)
		shared.Status = StatusCompleted
		for w := range 8 {
			wg.Go(func() {
				for k := range 8 {
					j := shared.Clone()
					j.ClientID = fmt.Sprintf("writer-%d-%d", w, k)
					if err := s.Save(ctx, j); err != nil {
						errc <- err
						return
					}
					if _, err := s.Job(ctx, "shared"); err != nil {
						errc <- err
					}
				}
			})
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Fatal(err)
		}
		var active []string
		for w := range workers {
			for k := 1; k < perWorker; k += 2 {
				active = append(active, fmt.Sprintf("w%d-%d", w, k))
			}
		}
		got := storeIDs(storeMustJobs(t)(s.ActiveJobs(ctx)))
		if len(got) != len(active) {
			t.Fatalf("%d active jobs, want %d: %v", len(got), len(active), got)
		}
		for u := range users {
			list := storeMustJobs(t)(s.UserJobs(ctx, fmt.Sprintf("u%d", u)))
			want := workers / users * perWorker
			if u == 0 {
				want++ // "shared"
			}
			if len(list) != want {
				t.Fatalf("u%d has %d jobs, want %d", u, len(list), want)
			}
			for _, j := range list {
				if j.ID == "shared" {
					if !strings.HasPrefix(j.ClientID, "writer-") {
						t.Fatalf("shared record is %+v", j)
					}
					continue
				}
				var k int
				fmt.Sscanf(j.ID[strings.IndexByte(j.ID, '-')+1:], "%d", &k)
				want := StatusCompleted
				if k%2 == 1 {
					want = StatusInProgress
				}
				if j.Status != want {
					t.Fatalf("%s is %s, want %s", j.ID, j.Status, want)
				}
			}
		}
	})
}

// storeTestJob returns a job with every field set.
func storeTestJob(id, user string, number float64) *Job {
	return &Job{
		ID:               id,
		UpstreamID:       "up-" + id,
		User:             user,
		ClientID:         "client-" + user,
		Pool:             "h200",
		Upstream:         "http://gpu-1:8188",
		Number:           number,
		Prompt:           json.RawMessage(`{"3":{"class_type":"KSampler","inputs":{"seed":42,"model":["4",0]}},"9":{"class_type":"SaveImage","inputs":{"images":["8",0]}}}`),
		ExtraData:        map[string]json.RawMessage{"extra_pnginfo": json.RawMessage(`{"workflow":{"id":"wf-1"}}`), "client_id": json.RawMessage(`"client"`)},
		OutputsToExecute: []string{"9", "12"},
		WorkflowID:       "wf-1",
		Status:           StatusInProgress,
		CreateTime:       1700000000000,
		StartTime:        1700000000100,
		EndTime:          1700000009000,
		Outputs: map[string]json.RawMessage{
			"9": json.RawMessage(`{"images":[{"filename":"ComfyUI_00001_.png","subfolder":"","type":"output"}]}`),
		},
		Messages: []HistoryMessage{
			{Type: "execution_start", Data: json.RawMessage(`{"prompt_id":"` + id + `","timestamp":1700000000100}`)},
			{Type: "execution_cached", Data: json.RawMessage(`{"nodes":["4"],"prompt_id":"` + id + `","timestamp":1700000000101}`)},
		},
		Error:       json.RawMessage(`{"exception_message":"none <&> \u00e9"}`),
		Hidden:      true,
		StoredBytes: 1000 + int64(number),
	}
}

func storeSameJob(t *testing.T, got, want *Job) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		g, _ := json.Marshal(got)
		w, _ := json.Marshal(want)
		t.Fatalf("job differs\n got: %s\nwant: %s", g, w)
	}
}

func storeIDs(jobs []*Job) []string {
	ids := make([]string, len(jobs))
	for i, j := range jobs {
		ids[i] = j.ID
	}
	return ids
}

// storeMustJobs returns a function that passes on a listing's jobs, failing
// t on its error.
func storeMustJobs(t *testing.T) func([]*Job, error) []*Job {
	return func(jobs []*Job, err error) []*Job {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return jobs
	}
}

func storeWantIDs(t *testing.T, s Store, user string, want ...string) {
	t.Helper()
	list, err := s.UserJobs(context.Background(), user)
	if err != nil {
		t.Fatal(err)
	}
	if got := storeIDs(list); !reflect.DeepEqual(got, append([]string{}, want...)) {
		t.Fatalf("UserJobs(%s) = %v, want %v", user, got, want)
	}
	for _, j := range list {
		if j.User != user {
			t.Fatalf("UserJobs(%s) lists %s of %s", user, j.ID, j.User)
		}
	}
	storeWantOutputs(t, s, user)
}

func storeWantActive(t *testing.T, s Store, want ...string) []*Job {
	t.Helper()
	list, err := s.ActiveJobs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := storeIDs(list); !reflect.DeepEqual(got, append([]string{}, want...)) {
		t.Fatalf("ActiveJobs = %v, want %v", got, want)
	}
	return list
}

// testValkeyAddr returns the test server's address, skipping the test when
// there is none (but failing it in CI, which must not skip silently).
func testValkeyAddr(t *testing.T) string {
	t.Helper()
	addr := os.Getenv("COMFYUME_TEST_VALKEY")
	if addr == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("COMFYUME_TEST_VALKEY is not set in CI (scripts/services/valkey.sh start_valkey sets it)")
		}
		t.Skip("COMFYUME_TEST_VALKEY is not set (source scripts/services/valkey.sh; start_valkey)")
	}
	return addr
}

func testValkeyOption(t *testing.T, addr string) valkey.ClientOption {
	t.Helper()
	if strings.Contains(addr, "://") {
		opt, err := valkey.ParseURL(addr)
		if err != nil {
			t.Fatalf("COMFYUME_TEST_VALKEY: %v", err)
		}
		return opt
	}
	return valkey.ClientOption{InitAddress: []string{addr}}
}

func testValkeyClient(t *testing.T, addr string) valkey.Client {
	t.Helper()
	client, err := valkey.NewClient(testValkeyOption(t, addr))
	if err != nil {
		t.Fatalf("connecting to Valkey at %s: %v", addr, err)
	}
	t.Cleanup(client.Close)
	return client
}

// testValkeyPrefix returns a key prefix unique to this test run, whose keys
// are removed when the test ends.
func testValkeyPrefix(t *testing.T, client valkey.Client) string {
	t.Helper()
	b := make([]byte, 8)
	rand.Read(b)
	prefix := "comfyume-test:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var cursor uint64
		for {
			e, err := client.Do(ctx, client.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
			if err != nil {
				t.Logf("cleaning up %s*: %v", prefix, err)
				return
			}
			if len(e.Elements) > 0 {
				client.Do(ctx, client.B().Unlink().Key(e.Elements...).Build())
			}
			if cursor = e.Cursor; cursor == 0 {
				return
			}
		}
	})
	return prefix
}

// TestValkeyStoreKeys checks the documented key layout.
func TestValkeyStoreKeys(t *testing.T) {
	client := testValkeyClient(t, testValkeyAddr(t))
	prefix := testValkeyPrefix(t, client)
	s := NewValkeyStore(client, prefix)
	ctx := context.Background()
	do := func(cmd valkey.Completed) valkey.ValkeyResult { return client.Do(ctx, cmd) }

	j := storeTestJob("k1", "alice", 3)
	j.Status = StatusPending
	if err := s.Save(ctx, j); err != nil {
		t.Fatal(err)
	}
	// The state record without the prompt and extra_data, which are kept
	// once under their own key.
	var stored Job
	if err := do(client.B().Get().Key(prefix + "job:k1").Build()).DecodeJSON(&stored); err != nil {
		t.Fatal(err)
	}
	if (len(stored.Prompt) > 0 && string(stored.Prompt) != "null") || len(stored.ExtraData) > 0 {
		t.Fatalf("state record carries the body: %+v", stored)
	}
	var body struct {
		Prompt    json.RawMessage            `json:"prompt"`
		ExtraData map[string]json.RawMessage `json:"extra_data"`
	}
	if err := do(client.B().Get().Key(prefix + "job:k1:body").Build()).DecodeJSON(&body); err != nil {
		t.Fatal(err)
	}
	stored.Prompt, stored.ExtraData = body.Prompt, body.ExtraData
	storeSameJob(t, &stored, j)
	// A later save rewrites only the small state record.
	j.Status = StatusInProgress
	if err := s.Save(ctx, j); err != nil {
		t.Fatal(err)
	}
	got, err := s.Job(ctx, "k1")
	if err != nil {
		t.Fatal(err)
	}
	storeSameJob(t, got, j)
	if sc, err := do(client.B().Zscore().Key(prefix + "user:alice:jobs").Member("k1").Build()).AsFloat64(); err != nil || sc != 3 {
		t.Fatalf("user index score = %v, %v", sc, err)
	}
	if sc, err := do(client.B().Zscore().Key(prefix + "active").Member("k1").Build()).AsFloat64(); err != nil || sc != 3 {
		t.Fatalf("active index score = %v, %v", sc, err)
	}
	if ok, err := s.Claim(ctx, "k1", "gw-a", 10*time.Second); err != nil || !ok {
		t.Fatalf("Claim = %v, %v", ok, err)
	}
	if owner, err := do(client.B().Get().Key(prefix + "lease:k1").Build()).ToString(); err != nil || owner != "gw-a" {
		t.Fatalf("lease holds %q, %v", owner, err)
	}
	if pttl, err := do(client.B().Pttl().Key(prefix + "lease:k1").Build()).AsInt64(); err != nil || pttl <= 0 || pttl > 10000 {
		t.Fatalf("lease PTTL = %d, %v", pttl, err)
	}
	j.Status = StatusCompleted
	if err := s.Save(ctx, j); err != nil {
		t.Fatal(err)
	}
	if err := do(client.B().Zscore().Key(prefix + "active").Member("k1").Build()).Error(); !valkey.IsValkeyNil(err) {
		t.Fatalf("completed job still in the active index (%v)", err)
	}
	if err := s.Delete(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	keys, err := do(client.B().Keys().Pattern(prefix + "*").Build()).AsStrSlice()
	if err != nil || len(keys) != 0 {
		t.Fatalf("after Delete, keys %v remain (%v)", keys, err)
	}
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestValkeyUnreachable: a client for a port nobody listens on fails at
// once instead of hanging.
func TestValkeyUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	start := time.Now()
	client, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}})
	if err == nil {
		client.Close()
		t.Fatal("NewClient for a closed port succeeded")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("NewClient took %v to fail", d)
	}
}

// TestValkeyStoreOutage cuts a live connection to Valkey: every method
// returns an error (not ErrNotFound, not a hang) while Valkey is away, and
// the store works again once it is back. A paused server gives context
// errors.
func TestValkeyStoreOutage(t *testing.T) {
	target := testValkeyAddr(t)
	if strings.Contains(target, "://") {
		target = testValkeyOption(t, target).InitAddress[0]
	}
	admin := testValkeyClient(t, target)
	prefix := testValkeyPrefix(t, admin)

	p := startStoreProxy(t, "127.0.0.1:0", target)
	client := testValkeyClient(t, p.addr)
	s := NewValkeyStore(client, prefix)
	s.Timeout = 300 * time.Millisecond
	ctx := context.Background()
	j := storeTestJob("o1", "alice", 1)
	if err := s.Save(ctx, j); err != nil {
		t.Fatal(err)
	}

	p.stop()
	ops := map[string]func() error{
		"Ping":       func() error { return s.Ping(ctx) },
		"Save":       func() error { return s.Save(ctx, j) },
		"Create":     func() error { return s.Create(ctx, storeTestJob("o2", "alice", 2)) },
		"Job":        func() error { _, err := s.Job(ctx, "o1"); return err },
		"UserJobs":   func() error { _, err := s.UserJobs(ctx, "alice"); return err },
		"ActiveJobs": func() error { _, err := s.ActiveJobs(ctx); return err },
		"Delete":     func() error { return s.Delete(ctx, "o1") },
		"Claim":      func() error { _, err := s.Claim(ctx, "o1", "gw", time.Second); return err },
	}
	for name, op := range ops {
		start := time.Now()
		err := op()
		d := time.Since(start)
		t.Logf("%s while down: %v after %v", name, err, d.Round(time.Millisecond))
		if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrExists) {
			t.Fatalf("%s while Valkey is down = %v, want a connection error", name, err)
		}
		if d > 3*time.Second {
			t.Fatalf("%s took %v to fail", name, d)
		}
	}

	// Back on the same address: the client reconnects by itself.
	if p2 := startStoreProxy(t, p.addr, target); p2 == nil {
		t.Log("could not listen on the old address again; skipping the recovery check")
	} else {
		deadline := time.Now().Add(5 * time.Second)
		for s.Ping(ctx) != nil {
			if time.Now().After(deadline) {
				t.Fatal("Ping still fails after Valkey came back")
			}
			time.Sleep(50 * time.Millisecond)
		}
		got, err := s.Job(ctx, "o1")
		if err != nil {
			t.Fatal(err)
		}
		storeSameJob(t, got, j)
	}

	// A server that does not answer: the caller's deadline ends the wait.
	s = NewValkeyStore(admin, prefix)
	if err := admin.Do(ctx, admin.B().ClientPause().Timeout(300).Write().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := s.Save(tctx, j)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Save on a paused server = %v, want a deadline error", err)
	}
	if d := time.Since(start); d > 250*time.Millisecond {
		t.Fatalf("Save on a paused server returned after %v", d)
	}
}

// storeProxy is a TCP relay to Valkey that a test can cut.
type storeProxy struct {
	addr  string
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

// startStoreProxy relays addr to target; nil if addr cannot be listened on.
func startStoreProxy(t *testing.T, addr, target string) *storeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if addr != "127.0.0.1:0" {
			return nil
		}
		t.Fatal(err)
	}
	p := &storeProxy{addr: ln.Addr().String(), ln: ln}
	t.Cleanup(p.stop)
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			if !p.track(c, u) {
				return
			}
			for _, pair := range [][2]net.Conn{{c, u}, {u, c}} {
				p.wg.Go(func() {
					io.Copy(pair[0], pair[1])
					pair[0].Close()
					pair[1].Close()
				})
			}
		}
	})
	return p
}

func (p *storeProxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln == nil { // stopped
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	p.conns = append(p.conns, cs...)
	return true
}

// stop closes the listener and every relayed connection.
func (p *storeProxy) stop() {
	p.mu.Lock()
	ln := p.ln
	p.ln = nil
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	if ln != nil {
		ln.Close()
	}
	for _, c := range conns {
		c.Close()
	}
	p.wg.Wait()
}

// storeWantCount checks a user's active count, and the total of their
// ended jobs' outputs of a store that keeps it.
func storeWantCount(t *testing.T, s Store, user string, want int) {
	t.Helper()
	n, err := s.ActiveCount(context.Background(), user)
	if err != nil || n != want {
		t.Fatalf("ActiveCount(%s) = %d, %v; want %d", user, n, err, want)
	}
	storeWantOutputs(t, s, user)
}

// storeWantOutputs checks, for a store that keeps each user's total
// StoredBytes of ended jobs, that it is what their records add up to.
func storeWantOutputs(t *testing.T, s Store, user string) {
	t.Helper()
	ot, ok := s.(outputTotals)
	if !ok {
		return
	}
	jobs, err := s.UserJobSummaries(context.Background(), user)
	if err != nil {
		t.Fatal(err)
	}
	var want int64
	for _, j := range jobs {
		if !j.Active() {
			want += j.StoredBytes
		}
	}
	if got, err := ot.EndedOutputBytes(context.Background(), user); err != nil || got != want {
		t.Fatalf("EndedOutputBytes(%s) = %d, %v; the records add up to %d", user, got, err, want)
	}
}

// TestMemoryStoreTrimAtTheLimit: a user at the history limit whose jobs
// keep ending loses exactly their oldest ended jobs, in ComfyUI's order
// (number, then id), however the store holds them; jobs that still wait
// or run are never forgotten.
func TestMemoryStoreTrimAtTheLimit(t *testing.T) {
	ctx := context.Background()
	s := NewMemoryStore()
	const keep = 50
	var want []string // every ended job, in SortJobs order
	save := func(id string, number float64, status string) {
		j := storeTestJob(id, "alice", number)
		j.Status = status
		if err := s.Save(ctx, j); err != nil {
			t.Fatal(err)
		}
	}
	save("waiting", 0, StatusPending)
	for i := 0; i < 400; i++ {
		// Numbers repeat (ties are broken by id) and come out of order.
		n := float64((i * 7) % 60)
		id := fmt.Sprintf("j%03d", i)
		save(id, n, StatusCompleted)
		want = append(want, id)
		ended := make([]*Job, 0, len(want))
		for _, id := range want {
			j, _ := s.JobSummary(ctx, id)
			ended = append(ended, j)
		}
		SortJobs(ended)
		var wantGone []string
		for _, j := range ended[:max(0, len(ended)-keep)] {
			wantGone = append(wantGone, j.ID)
		}
		gone, err := s.Trim(ctx, "alice", keep, 0)
		if err != nil || fmt.Sprint(gone) != fmt.Sprint(wantGone) {
			t.Fatalf("after %d jobs: Trim forgot %v (%v), want %v", i+1, gone, err, wantGone)
		}
		want = want[:0]
		for _, j := range ended[len(wantGone):] {
			want = append(want, j.ID)
		}
	}
	if j, err := s.JobSummary(ctx, "waiting"); err != nil || j == nil {
		t.Fatalf("the waiting job was forgotten: %v", err)
	}
	jobs, _ := s.UserJobSummaries(ctx, "alice")
	if len(jobs) != keep+1 {
		t.Fatalf("alice has %d jobs, want %d ended and the waiting one", len(jobs), keep)
	}
}

// TestOldestJobsIsTheSortedPrefix: oldestJobs picks what SortJobs puts
// first, for any k, with ties on the number.
func TestOldestJobsIsTheSortedPrefix(t *testing.T) {
	for round := 0; round < 200; round++ {
		n := 1 + round%37
		jobs := make([]*Job, n)
		for i := range jobs {
			jobs[i] = &Job{ID: fmt.Sprintf("id%02d.%d", (i*13+round)%n, i), Number: float64((i*i + round) % 5)}
		}
		sorted := slices.Clone(jobs)
		SortJobs(sorted)
		for k := 1; k <= n; k++ {
			got := oldestJobs(jobs, k)
			if !slices.Equal(got, sorted[:k]) {
				t.Fatalf("round %d, k %d: oldestJobs gave %v, SortJobs %v", round, k, jobIDs(got), jobIDs(sorted[:k]))
			}
		}
	}
}

func jobIDs(jobs []*Job) []string {
	var ids []string
	for _, j := range jobs {
		ids = append(ids, fmt.Sprintf("%s#%v", j.ID, j.Number))
	}
	return ids
}

// BenchmarkMemoryStoreTrimAtTheLimit is what the end of a job costs a user
// at the history limit (DefaultHistoryLimit ended jobs): one to forget.
func BenchmarkMemoryStoreTrimAtTheLimit(b *testing.B) {
	ctx := context.Background()
	s := NewMemoryStore()
	next := 0
	add := func() {
		j := storeTestJob(fmt.Sprintf("j%07d", next), "alice", float64(next))
		j.Status = StatusCompleted
		next++
		if err := s.Save(ctx, j); err != nil {
			b.Fatal(err)
		}
	}
	for range DefaultHistoryLimit {
		add()
	}
	b.ResetTimer()
	for range b.N {
		add()
		if gone, err := s.Trim(ctx, "alice", DefaultHistoryLimit, 0); err != nil || len(gone) != 1 {
			b.Fatalf("Trim forgot %v (%v), want one job", gone, err)
		}
	}
}
