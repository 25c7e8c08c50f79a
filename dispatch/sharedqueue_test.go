package dispatch

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/valkey-io/valkey-go"
)

func newTestSharedQueue(t *testing.T) *ValkeyStore {
	t.Helper()
	client := testValkeyClient(t, testValkeyAddr(t))
	return NewValkeyStore(client, testValkeyPrefix(t, client))
}

// The shared queue picks jobs in exactly the order of the memory queue:
// the same arrivals (users, priorities), running caps and slot releases
// give the same sequence of jobs. Random scenarios, fixed seeds.
func TestSharedQueueMatchesMemoryQueue(t *testing.T) {
	client := testValkeyClient(t, testValkeyAddr(t))
	prefix := testValkeyPrefix(t, client)
	for seed := uint64(1); seed <= 30; seed++ {
		s := NewValkeyStore(client, fmt.Sprintf("%s%d:", prefix, seed))
		compareWithMemoryQueue(t, s, seed)
	}
}

func compareWithMemoryQueue(t *testing.T, s *ValkeyStore, seed uint64) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 7))
	q := newFairQueue()
	users := []string{"alice", "bob", "carol", "dave", "erin", "frank"}
	prios := map[string]int{"alice": 0, "bob": 0, "carol": 0, "dave": 0, "erin": 5, "frank": -1}
	const jobs = 40
	maxRunning := 1 + rng.IntN(3)
	ep := []EndpointSlots{{Endpoint: "http://gpu-a", Max: 2}, {Endpoint: "http://gpu-b", Max: 1}}
	base := time.Now().UnixMilli()
	next := 0
	push := func() {
		u := users[rng.IntN(len(users))]
		if rng.IntN(4) == 0 {
			u = "alice" // a heavy user
		}
		j := &Job{ID: fmt.Sprintf("job%02d", next), User: u, Priority: prios[u], Pool: "gpu", CreateTime: base + int64(next)}
		next++
		if err := s.Enqueue(ctx, QueuedJob{Pool: "gpu", ID: j.ID, User: j.User, Priority: j.Priority, Order: float64(j.CreateTime)}); err != nil {
			t.Fatal(err)
		}
		q.push(&run{job: j})
	}
	for next < 10 {
		push()
	}
	running := map[string]int{}
	var held []*Assignment
	var order []string
	for step := 0; step < 2000 && len(order) < jobs; step++ {
		switch k := rng.IntN(6); {
		case k == 0 && next < jobs:
			push()
		case k <= 2 && len(held) < 3:
			a, err := s.Take(ctx, TakeRequest{Pool: "gpu", Endpoints: ep, MaxRunning: maxRunning, Token: fmt.Sprint("t", step), TTL: time.Minute, Owner: "me"})
			if err != nil {
				t.Fatal(err)
			}
			want := q.next(func(u string) bool { return running[u] < maxRunning }, running)
			switch {
			case a == nil && want == nil:
			case a == nil || want == nil || a.JobID != want.job.ID:
				t.Fatalf("seed %d step %d: shared queue took %+v, memory queue %+v (running %v, order so far %v)", seed, step, a, want, running, order)
			default:
				held = append(held, a)
				running[a.User]++
				order = append(order, a.JobID)
			}
		case len(held) > 0:
			i := rng.IntN(len(held))
			a := held[i]
			held = append(held[:i], held[i+1:]...)
			if err := s.ReleaseSlot(ctx, a.Endpoint, a.Token); err != nil {
				t.Fatal(err)
			}
			running[a.User]--
		}
	}
	if len(order) != jobs {
		t.Fatalf("seed %d: only %d of %d jobs taken: %v", seed, len(order), jobs, order)
	}
}

// Slots, caps, put-backs, cancels, counts and the hand-over to the
// gateway holding a job.
func TestSharedQueueTake(t *testing.T) {
	s := newTestSharedQueue(t)
	ctx := context.Background()
	enq := func(id, user string, order int) {
		t.Helper()
		if err := s.Enqueue(ctx, QueuedJob{Pool: "p", ID: id, User: user, Order: float64(order)}); err != nil {
			t.Fatal(err)
		}
	}
	take := func(req TakeRequest) *Assignment {
		t.Helper()
		req.Pool, req.TTL = "p", time.Minute
		if req.Token == "" {
			req.Token = fmt.Sprint(time.Now().UnixNano())
		}
		if req.Owner == "" {
			req.Owner = "me"
		}
		a, err := s.Take(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	one := []EndpointSlots{{Endpoint: "http://gpu", Max: 1}}

	if a := take(TakeRequest{Endpoints: one}); a != nil {
		t.Fatalf("empty queue gave %+v", a)
	}
	enq("a1", "alice", 1)
	enq("a2", "alice", 2)
	enq("a1", "alice", 1) // again: still one entry
	if n, _ := s.Waiting(ctx, "p", "alice"); n != 2 {
		t.Fatalf("alice waits with %d jobs, want 2", n)
	}
	if n, _ := s.PoolWaiting(ctx, "p"); n != 1 {
		t.Fatalf("%d users wait, want 1", n)
	}
	a := take(TakeRequest{Endpoints: one})
	if a == nil || a.JobID != "a1" || a.Endpoint != "http://gpu" || a.User != "alice" {
		t.Fatalf("first take %+v", a)
	}
	if b := take(TakeRequest{Endpoints: one}); b != nil {
		t.Fatalf("full endpoint gave %+v", b)
	}
	// A trial endpoint is used when the healthy ones are full.
	b := take(TakeRequest{Endpoints: one, Trial: []EndpointSlots{{Endpoint: "http://cold", Max: 1}}})
	if b == nil || b.JobID != "a2" || b.Endpoint != "http://cold" {
		t.Fatalf("trial take %+v", b)
	}
	// The job put back keeps its place ahead of a later one.
	enq("a3", "alice", 3)
	enq("a2", "alice", 2)
	if err := s.ReleaseSlot(ctx, a.Endpoint, a.Token); err != nil {
		t.Fatal(err)
	}
	if c := take(TakeRequest{Endpoints: one, Others: []string{"http://cold"}, MaxRunning: 1}); c != nil {
		t.Fatalf("alice at her running cap (her job on the cold endpoint counts) got %+v", c)
	}
	if c := take(TakeRequest{Endpoints: one, MaxRunning: 2}); c == nil || c.JobID != "a2" {
		t.Fatalf("put-back job: %+v", c)
	}
	// Cancel: out of the queue once.
	if ok, _ := s.Dequeue(ctx, "p", "alice", "a3"); !ok {
		t.Fatal("dequeue of a waiting job")
	}
	if ok, _ := s.Dequeue(ctx, "p", "alice", "a3"); ok {
		t.Fatal("dequeue twice")
	}
	if n, _ := s.Waiting(ctx, "p", "alice"); n != 0 {
		t.Fatalf("alice still waits with %d", n)
	}
	if n, _ := s.PoolWaiting(ctx, "p"); n != 0 {
		t.Fatalf("%d users wait, want none", n)
	}

	// A job held by another gateway goes to its inbox.
	if ok, _ := s.Claim(ctx, "b1", "other", time.Minute); !ok {
		t.Fatal("claim")
	}
	enq("b1", "bob", 1)
	two := []EndpointSlots{{Endpoint: "http://big", Max: 2}}
	got := take(TakeRequest{Endpoints: two})
	if got == nil || got.JobID != "b1" || got.Owner != "other" {
		t.Fatalf("take of another gateway's job: %+v", got)
	}
	in, err := s.Assignments(ctx, "other", time.Second)
	if err != nil || len(in) != 1 || in[0].JobID != "b1" || in[0].Endpoint != "http://big" || in[0].Token != got.Token || in[0].Pool != "p" || in[0].User != "bob" {
		t.Fatalf("other's inbox: %+v %v", in, err)
	}
	if in, err := s.Assignments(ctx, "me", 100*time.Millisecond); err != nil || len(in) != 0 {
		t.Fatalf("my inbox: %+v %v", in, err)
	}
	// A job nobody holds is given to the caller, owner "".
	enq("c1", "carol", 1)
	if c := take(TakeRequest{Endpoints: two}); c == nil || c.JobID != "c1" || c.Owner != "" {
		t.Fatalf("unheld job: %+v", c)
	}
}

// QueueState gives what positions are computed from.
func TestSharedQueueState(t *testing.T) {
	s := newTestSharedQueue(t)
	ctx := context.Background()
	for i, u := range []string{"alice", "alice", "bob|with bar", "alice"} {
		if err := s.Enqueue(ctx, QueuedJob{Pool: "p", ID: fmt.Sprint("j", i), User: u, Priority: 3, Order: float64(i)}); err != nil {
			t.Fatal(err)
		}
	}
	a, err := s.Take(ctx, TakeRequest{Pool: "p", Endpoints: []EndpointSlots{{Endpoint: "http://gpu", Max: 1}}, Token: "tok", TTL: time.Minute, Owner: "me"})
	if err != nil || a == nil || a.JobID != "j0" {
		t.Fatalf("take %+v %v", a, err)
	}
	st, err := s.QueueState(ctx, "p", []string{"http://gpu"})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Users) != 2 || st.Users[0].User != "bob|with bar" || st.Users[0].Served != 0 || st.Users[0].Priority != 3 ||
		st.Users[1].User != "alice" || st.Users[1].Served == 0 || fmt.Sprint(st.Users[1].Jobs) != "[j1 j3]" {
		t.Fatalf("state %+v", st.Users)
	}
	if st.Running["alice"] != 1 || len(st.Running) != 1 {
		t.Fatalf("running %v", st.Running)
	}
}

// Decisions per second of the shared queue with 1,000 users × 5 waiting
// jobs in 3 priority classes: each iteration takes the next job (timed on
// its own: µs/take), frees its slot and puts a job of that user back (one
// Valkey round trip each; ns/op is the three together).
func BenchmarkSharedQueue1000Users(b *testing.B) {
	addr := os.Getenv("COMFYUME_TEST_VALKEY")
	if addr == "" {
		b.Skip("COMFYUME_TEST_VALKEY is not set")
	}
	client, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	prefix := fmt.Sprintf("comfyume-bench:%d:", time.Now().UnixNano())
	s := NewValkeyStore(client, prefix)
	ctx := context.Background()
	for u := 0; u < 1000; u++ {
		for i := 0; i < 5; i++ {
			if err := s.Enqueue(ctx, QueuedJob{Pool: "p", ID: fmt.Sprintf("%d-%d", u, i), User: fmt.Sprint("user", u), Priority: u % 3, Order: float64(i)}); err != nil {
				b.Fatal(err)
			}
		}
	}
	eps := []EndpointSlots{{Endpoint: "http://gpu-a", Max: 2}, {Endpoint: "http://gpu-b", Max: 2}}
	var taking time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		a, err := s.Take(ctx, TakeRequest{Pool: "p", Endpoints: eps, MaxRunning: 1, Token: fmt.Sprint(i), TTL: time.Minute, Owner: "me"})
		taking += time.Since(t0)
		if err != nil || a == nil {
			b.Fatalf("take: %+v %v", a, err)
		}
		if err := s.ReleaseSlot(ctx, a.Endpoint, a.Token); err != nil {
			b.Fatal(err)
		}
		if err := s.Enqueue(ctx, QueuedJob{Pool: "p", ID: a.JobID, User: a.User, Order: float64(i + 10)}); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(taking.Microseconds())/float64(b.N), "µs/take")
	b.ReportMetric(float64(b.N)/taking.Seconds(), "takes/s")
	var cursor uint64
	for {
		e, err := client.Do(ctx, client.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			return
		}
		if len(e.Elements) > 0 {
			client.Do(ctx, client.B().Unlink().Key(e.Elements...).Build())
		}
		if cursor = e.Cursor; cursor == 0 {
			return
		}
	}
}

// What the jobs panel costs with Valkey: a user with 50 finished jobs, each
// carrying a 1 MiB UI workflow. Full records vs summaries.
func BenchmarkUserJobs50x1MiB(b *testing.B) {
	addr := os.Getenv("COMFYUME_TEST_VALKEY")
	if addr == "" {
		b.Skip("COMFYUME_TEST_VALKEY is not set")
	}
	client, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	prefix := fmt.Sprintf("comfyume-bench:%d:", time.Now().UnixNano())
	s := NewValkeyStore(client, prefix)
	ctx := context.Background()
	wf := []byte(`{"id":"w","nodes":[` + strings.Repeat(`{"id":1,"type":"CLIPTextEncode","pos":[10,20]},`, 22000) + `{}]}`)
	for i := 0; i < 50; i++ {
		j := &Job{ID: fmt.Sprint("j", i), User: "alice", Number: float64(i), Status: StatusCompleted,
			Prompt: json.RawMessage(`{"1":{"class_type":"SaveImage","inputs":{}}}`), ExtraData: map[string]json.RawMessage{"extra_pnginfo": json.RawMessage(`{"workflow":` + string(wf) + `}`)}}
		if err := s.Create(ctx, j); err != nil {
			b.Fatal(err)
		}
	}
	defer func() {
		keys, _ := client.Do(ctx, client.B().Keys().Pattern(prefix+"*").Build()).AsStrSlice()
		if len(keys) > 0 {
			client.Do(ctx, client.B().Unlink().Key(keys...).Build())
		}
	}()
	for _, c := range []struct {
		name string
		read func(context.Context, string) ([]*Job, error)
	}{{"full", s.UserJobs}, {"summaries", s.UserJobSummaries}} {
		b.Run(c.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if list, err := c.read(ctx, "alice"); err != nil || len(list) != 50 {
					b.Fatal(len(list), err)
				}
			}
		})
	}
	// One job, as every /view of an output checks its owner.
	for _, c := range []struct {
		name string
		read func(context.Context, string) (*Job, error)
	}{{"one-full", s.Job}, {"one-summary", s.JobSummary}} {
		b.Run(c.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if j, err := c.read(ctx, "j7"); err != nil || j.User != "alice" {
					b.Fatal(err)
				}
			}
		})
	}
}
