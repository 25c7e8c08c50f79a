package dispatch

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// Users are whatever an operator's auth says: names with "}", ":", "*" or
// newlines. Issue 8, finding 7: no two users share a Valkey key, no id
// reads another record's key, and a job handed to another gateway reaches
// it whatever its user's name holds.
func TestValkeyKeysFromUserStrings(t *testing.T) {
	s := newTestSharedQueue(t)
	ctx := context.Background()
	users := []string{"alice", "alice:jobs", "alice}:x", "{alice}", "*", "a*", "line\nbreak", "line", ":jobs", ""}
	for i, u := range users {
		j := storeTestJob(fmt.Sprintf("k%d", i), u, float64(i))
		j.Status = StatusCompleted
		if err := s.Create(ctx, j); err != nil {
			t.Fatal(err)
		}
	}
	for i, u := range users {
		storeWantIDs(t, s, u, fmt.Sprintf("k%d", i))
	}
	// A record's other keys are not records.
	for _, id := range []string{"k1:body", "k1:jobs", "k*", "../k1", "k1\n"} {
		if j, err := s.Job(ctx, id); err != ErrNotFound {
			t.Errorf("Job(%q) = %+v, %v; want ErrNotFound", id, j, err)
		}
		if j, err := s.JobSummary(ctx, id); err != ErrNotFound {
			t.Errorf("JobSummary(%q) = %+v, %v; want ErrNotFound", id, j, err)
		}
	}
	// The shared queue: a user with a newline in their name.
	for i, u := range []string{"line\nbreak", "a|b\n|c"} {
		id := fmt.Sprintf("q%d", i)
		if ok, _ := s.Claim(ctx, id, "other", time.Minute); !ok {
			t.Fatal("claim")
		}
		if err := s.Enqueue(ctx, QueuedJob{Pool: "p", ID: id, User: u, Order: 1}); err != nil {
			t.Fatal(err)
		}
		a, err := s.Take(ctx, TakeRequest{Pool: "p", TTL: time.Minute, Token: fmt.Sprintf("tok%d", i), Owner: "me",
			Endpoints: []EndpointSlots{{Endpoint: "http://gpu", Max: 4}}})
		if err != nil || a == nil || a.JobID != id || a.User != u {
			t.Fatalf("take: %+v %v", a, err)
		}
		in, err := s.Assignments(ctx, "other", time.Second)
		if err != nil || len(in) != 1 || in[0].JobID != id || in[0].User != u || in[0].Token != a.Token {
			t.Fatalf("user %q: the holder's inbox has %+v (%v), want %+v", u, in, err, a)
		}
	}
}

// An inbox entry reads back as written, whatever the user's name holds.
func FuzzParseAssignment(f *testing.F) {
	f.Add("p", "k1", "http://gpu", "6f1c0e0a-0000-4000-8000-000000000000", "alice")
	f.Add("p", "k1", "http://gpu", "t", "line\nbreak|x\n")
	f.Add("p", "", "", "", "")
	f.Fuzz(func(t *testing.T, pool, id, ep, token, user string) {
		for _, s := range []string{pool, id, ep, token} {
			if strings.ContainsAny(s, "\n") {
				return
			}
		}
		if strings.Contains(token, "|") {
			return
		}
		member := token + "|" + user
		a, ok := parseAssignment(pool + "\n" + id + "\n" + ep + "\n" + member + "\n" + user)
		if !ok || a.Pool != pool || a.JobID != id || a.Endpoint != ep || a.Token != member || a.User != user {
			t.Fatalf("read back as %+v %v", a, ok)
		}
	})
}
