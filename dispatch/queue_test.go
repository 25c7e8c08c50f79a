package dispatch

import (
	"fmt"
	"testing"
)

func qrun(user string, prio int, id string) *run {
	return &run{job: &Job{ID: id, User: user, Priority: prio}}
}

func drainOrder(q *fairQueue, eligible func(string) bool) []string {
	var out []string
	for r := q.next(eligible, nil); r != nil; r = q.next(eligible, nil) {
		out = append(out, r.job.ID)
	}
	return out
}

func all(string) bool { return true }

// One user's batch does not hold up the others: users take turns.
func TestFairQueueRoundRobin(t *testing.T) {
	q := newFairQueue()
	for i := 1; i <= 5; i++ {
		q.push(qrun("alice", 0, fmt.Sprintf("a%d", i)))
	}
	q.push(qrun("bob", 0, "b1"))
	q.push(qrun("carol", 0, "c1"))
	q.push(qrun("bob", 0, "b2"))
	pos := q.positions(nil)
	got := drainOrder(q, all)
	want := []string{"a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	// positions predicted that same order
	for r, p := range pos {
		if want[p-1] != r.job.ID {
			t.Fatalf("position %d for %s, but %s ran there", p, r.job.ID, want[p-1])
		}
	}
	if q.len() != 0 || len(q.turn()) != 0 || len(q.prios) != 0 {
		t.Fatalf("queue not empty: %d %v", q.len(), q.turn())
	}
}

func TestFairQueuePriorityAndEligibility(t *testing.T) {
	q := newFairQueue()
	q.push(qrun("alice", 0, "a1"))
	q.push(qrun("bob", 0, "b1"))
	q.push(qrun("teacher", 10, "t1"))
	q.push(qrun("teacher", 10, "t2"))
	// teacher first (priority), then the others in turn; a user at their
	// running cap is skipped without losing their place.
	if r := q.next(all, nil); r.job.ID != "t1" {
		t.Fatalf("first %s", r.job.ID)
	}
	if r := q.next(func(u string) bool { return u != "teacher" }, nil); r.job.ID != "a1" {
		t.Fatalf("second %s", r.job.ID)
	}
	if r := q.next(all, nil); r.job.ID != "t2" {
		t.Fatalf("third %s", r.job.ID)
	}
	if r := q.next(func(u string) bool { return false }, nil); r != nil {
		t.Fatalf("nobody eligible, got %s", r.job.ID)
	}
	b1 := q.byUser["bob"][0]
	if !q.remove(b1) || q.remove(b1) || q.len() != 0 {
		t.Fatalf("remove")
	}
}

// A user with a job running waits behind one who has none.
func TestFairQueueFewestRunningFirst(t *testing.T) {
	q := newFairQueue()
	q.push(qrun("alice", 0, "a2"))
	q.push(qrun("bob", 0, "b1"))
	running := map[string]int{"alice": 1}
	if pos := q.positions(running); pos[q.byUser["bob"][0]] != 1 {
		t.Fatalf("positions %v", pos)
	}
	if r := q.next(all, running); r.job.ID != "b1" {
		t.Fatalf("next %s", r.job.ID)
	}
}

func BenchmarkFairQueue1000Users(b *testing.B) {
	q := newFairQueue()
	for u := 0; u < 1000; u++ {
		for i := 0; i < 5; i++ {
			q.push(qrun(fmt.Sprintf("user%d", u), u%3, fmt.Sprintf("%d-%d", u, i)))
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r := q.next(all, nil)
		q.push(r) // keep the queue at 5,000 jobs
	}
}
