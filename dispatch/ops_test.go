package dispatch

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// The failures kept for the operator are bounded — RecentFailures in this
// gateway's ring and in Valkey's shared list — newest first, with each
// message cut to MaxFailureMessage bytes (a GPU server may send anything).
func TestFailureLogsAreBounded(t *testing.T) {
	check := func(t *testing.T, add func(Failure), latest func(n int) []Failure) {
		for i := 0; i < RecentFailures+5; i++ {
			add(Failure{JobID: fmt.Sprint(i), User: "u", Message: "m"})
		}
		got := latest(RecentFailures * 2)
		if len(got) != RecentFailures || got[0].JobID != fmt.Sprint(RecentFailures+4) || got[len(got)-1].JobID != "5" {
			t.Fatalf("kept %d failures, first %q last %q; want %d, newest first", len(got), got[0].JobID, got[len(got)-1].JobID, RecentFailures)
		}
	}
	t.Run("memory", func(t *testing.T) {
		var r failureRing
		check(t, r.add, r.latest)
	})
	t.Run("valkey", func(t *testing.T) {
		client := testValkeyClient(t, testValkeyAddr(t))
		s := NewValkeyStore(client, testValkeyPrefix(t, client))
		ctx := context.Background()
		check(t, func(f Failure) {
			if err := s.AddFailure(ctx, f); err != nil {
				t.Fatal(err)
			}
		}, func(n int) []Failure {
			out, err := s.Failures(ctx, min(n, RecentFailures*2))
			if err != nil {
				t.Fatal(err)
			}
			return out
		})
	})
	huge := strings.Repeat("é", MaxFailureMessage)
	errJSON, _ := json.Marshal(map[string]string{"exception_message": huge, "exception_type": "RuntimeError", "node_type": "KSampler"})
	f := failureOf(&Job{ID: "j", User: "u", Pool: "p", Upstream: "http://gpu", Error: errJSON, EndTime: 5})
	if len(f.Message) > MaxFailureMessage+len("…") || !strings.HasPrefix(huge, strings.TrimSuffix(f.Message, "…")) || f.Node != "KSampler" || f.Type != "RuntimeError" || f.Time != 5 {
		t.Fatalf("failure of a job with a huge message: %d bytes, %+v", len(f.Message), f.Node)
	}
}
