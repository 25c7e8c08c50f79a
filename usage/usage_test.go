package usage

import (
	"context"
	"errors"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/valkey-io/valkey-go"
)

// ledgers returns the memory ledger and, with COMFYUME_TEST_VALKEY, a
// Valkey ledger under a fresh prefix (required under CI).
func ledgers(t *testing.T) map[string]Ledger {
	out := map[string]Ledger{"memory": NewMemoryLedger()}
	addr := os.Getenv("COMFYUME_TEST_VALKEY")
	if addr == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("COMFYUME_TEST_VALKEY not set: scripts/test.sh starts Valkey")
		}
		return out
	}
	client, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	out["valkey"] = NewValkeyLedger(client, "t"+uuid.NewString()[:8]+":")
	return out
}

// Both ledgers apply the same rules: limits, extras from raise and reset,
// a job recorded once, rows filtered and sorted.
func TestLedgerRules(t *testing.T) {
	ctx := context.Background()
	day := "2026-03-04"
	for name, l := range ledgers(t) {
		t.Run(name, func(t *testing.T) {
			lim := Limits{GPU: time.Minute, Jobs: 2}
			for i := 0; i < 2; i++ {
				if err := l.Admit(ctx, day, "gpu", "a|b", lim); err != nil {
					t.Fatal(err)
				}
			}
			var ex *ExceededError
			if err := l.Admit(ctx, day, "gpu", "a|b", lim); !errors.As(err, &ex) || ex.Kind != KindJobs || ex.Used != 2 || ex.Limit != 2 {
				t.Fatalf("third prompt: %v", err)
			}
			if !ex.Resets.Equal(time.Date(2026, 3, 5, 0, 0, 0, 0, time.UTC)) {
				t.Fatalf("resets %v", ex.Resets)
			}
			if err := l.Unadmit(ctx, day, "gpu", "a|b"); err != nil {
				t.Fatal(err)
			}
			if err := l.Admit(ctx, day, "gpu", "a|b", lim); err != nil {
				t.Fatalf("after an unadmit: %v", err)
			}
			e := JobEnd{JobID: "j1", Day: day, Pool: "gpu", User: "a|b", Outcome: Lost, GPU: 61 * time.Second, Wait: 2 * time.Second, OutputBytes: 7}
			for i := 0; i < 2; i++ { // the second is a duplicate
				if err := l.Record(ctx, e); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Raise(ctx, day, "gpu", "a|b", 0, 5); err != nil {
				t.Fatal(err)
			}
			if err := l.Admit(ctx, day, "gpu", "a|b", lim); !errors.As(err, &ex) || ex.Kind != KindGPU || ex.Used != 61000 {
				t.Fatalf("over GPU time: %v", err)
			}
			if !strings.Contains(ex.Error(), "1m 1s of 1m") {
				t.Fatalf("message %q", ex.Error())
			}
			if err := l.Reset(ctx, day, "gpu", "a|b"); err != nil {
				t.Fatal(err)
			}
			if err := l.Admit(ctx, day, "gpu", "a|b", lim); err != nil {
				t.Fatalf("after reset: %v", err)
			}
			_ = l.Record(ctx, JobEnd{JobID: "j2", Day: "2026-03-05", Pool: "gpu", User: "z", Outcome: Success, GPU: time.Second})
			rows, err := l.Usage(ctx, Query{Since: "2026-03-01", Until: "2026-03-31"})
			if err != nil || len(rows) != 2 {
				t.Fatalf("rows %+v %v", rows, err)
			}
			r := rows[0]
			want := Row{Day: day, Pool: "gpu", User: "a|b", Jobs: 1, Lost: 1, GPUSeconds: 61, WaitSeconds: 2, OutputBytes: 7,
				Admitted: 3, QuotaGPUSeconds: 60, QuotaJobs: 2, ExtraGPUSeconds: 61, ExtraJobs: 2}
			if r != want || rows[1].User != "z" || rows[1].Success != 1 {
				t.Fatalf("rows\n%+v\nwant\n%+v", rows, want)
			}
			if rows, _ := l.Usage(ctx, Query{Since: "2026-03-01", Until: "2026-03-31", User: "z", Pool: "gpu"}); len(rows) != 1 {
				t.Fatalf("filtered: %+v", rows)
			}
			if one, _ := l.Usage(ctx, Query{Since: day, Until: day, User: "a|b", Pool: "gpu"}); len(one) != 1 || one[0] != want {
				t.Fatalf("one user's row\n%+v\nwant\n%+v", one, want)
			}
			if err := l.Admit(ctx, day, "bad|pool", "u", lim); err == nil {
				t.Fatal("a pool name with | was accepted")
			}
		})
	}
}

// Many gateways admitting at once never admit more than the limit: the
// check and the count are one step.
func TestAdmitIsAtomic(t *testing.T) {
	ctx := context.Background()
	for name, l := range ledgers(t) {
		t.Run(name, func(t *testing.T) {
			var wg sync.WaitGroup
			var mu sync.Mutex
			ok := 0
			for i := 0; i < 50; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if l.Admit(ctx, "2026-01-01", "p", "u", Limits{Jobs: 7}) == nil {
						mu.Lock()
						ok++
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			if ok != 7 {
				t.Fatalf("%d admitted, want 7", ok)
			}
		})
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{0: "0s", 400 * time.Millisecond: "0s", 45 * time.Second: "45s",
		30*time.Minute + 12*time.Second: "30m 12s", 6*time.Hour + 40*time.Minute + 5*time.Second: "6h 40m", 2 * time.Hour: "2h"} {
		if got := FormatDuration(d); got != want {
			t.Errorf("%v: %q, want %q", d, got, want)
		}
	}
}

func FuzzParseQuery(f *testing.F) {
	for _, s := range []string{"", "since=2026-01-01&until=2026-01-31", "since=2026-02-30", "user=%00", "since=2026-01-01&until=2020-01-01",
		"format=csv&pool=gpu", "x=1", "user=a&user=b", "until=2026-12-31"} {
		f.Add(s)
	}
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, raw string) {
		v, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		q, err := ParseQuery(v, now)
		if err != nil {
			var qe *QueryError
			if !errors.As(err, &qe) || len(qe.Msg) > 300 {
				t.Fatalf("error %T %q", err, err)
			}
			return
		}
		days := q.Days()
		if len(days) == 0 || len(days) > MaxQueryDays || days[0] != q.Since || days[len(days)-1] != q.Until {
			t.Fatalf("%q: %+v gives %d days", raw, q, len(days))
		}
		if len(q.User) > 1024 || len(q.Pool) > 1024 {
			t.Fatal("unbounded name")
		}
	})
}

func TestRowLimits(t *testing.T) {
	r := Row{QuotaGPUSeconds: 60, ExtraGPUSeconds: 30, GPUSeconds: 89, QuotaJobs: 2, ExtraJobs: 1, Admitted: 2}
	if d, ok := r.GPULimit(); !ok || d != 90*time.Second || r.OverQuota() {
		t.Fatalf("%v %v %v", d, ok, r.OverQuota())
	}
	r.Admitted = 3
	if !r.OverQuota() {
		t.Fatal("3 of 3 prompts is not over")
	}
	if _, ok := (Row{GPUSeconds: 1e6}).GPULimit(); ok || (Row{GPUSeconds: 1e6, Admitted: 1e6}).OverQuota() {
		t.Fatal("no quota is a limit")
	}
	l := NewMemoryLedger()
	_ = l.Admit(context.Background(), DayOf(time.Now()), "p", "u", Limits{Jobs: 1})
	if rows, err := Today(context.Background(), l, "u"); err != nil || len(rows) != 1 || !rows[0].OverQuota() {
		t.Fatalf("today: %+v %v", rows, err)
	}
}
