package comfy

import (
	"fmt"
	"strings"
	"testing"
)

// checkScanner scans frames in order with one Scanner and checks each
// Head against ScanEvent's (and so, through checkScan, encoding/json's).
func checkScanner(t *testing.T, frames ...[]byte) {
	t.Helper()
	var s Scanner
	for i, b := range frames {
		got, ok := s.Scan(b)
		want, wantOK := ScanEvent(b)
		if ok != wantOK || got != want {
			t.Fatalf("frame %d %q:\nScanner   %+v (ok=%v)\nScanEvent %+v (ok=%v)", i, b, got, ok, want, wantOK)
		}
	}
}

// withDigits returns b with its digits replaced, in order, by those of
// digits (as far as digits goes; other bytes of digits are skipped).
func withDigits(b, digits []byte) []byte {
	out := append([]byte(nil), b...)
	d := 0
	for i, c := range out {
		if !isDigit(c) {
			continue
		}
		for d < len(digits) && !isDigit(digits[d]) {
			d++
		}
		if d == len(digits) {
			break
		}
		out[i] = digits[d]
		d++
	}
	return out
}

// A stream of steps: each frame differs from the one before it in digits
// only, and every Head is what a whole scan reads.
func TestScannerFollowsSteps(t *testing.T) {
	var frames [][]byte
	for step := 1; step <= 120; step++ {
		for _, f := range eventFrames[:2] {
			frames = append(frames, []byte(strings.ReplaceAll(strings.ReplaceAll(f.frame, `"value": 17`, fmt.Sprintf(`"value": %d`, step)), `"max": 20`, `"max": 120`)))
		}
	}
	checkScanner(t, frames...)
}

// Frames a lying server could make from the last one by changing digits
// only: each must read as its own, never as the kept frame.
func TestScannerDigitsThatChangeTheHead(t *testing.T) {
	const pid = "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10"
	base := `{"type":"progress","data":{"value":17,"max":20,"prompt_id":"` + pid + `","node":"3","display_node":"3"}}`
	for name, next := range map[string]string{
		"another prompt_id":            strings.Replace(base, "0b6c3f6e", "0b6c3f60", 1),
		"another node":                 strings.Replace(base, `"node":"3"`, `"node":"4"`, 1),
		"another display_node":         strings.Replace(base, `"display_node":"3"`, `"display_node":"4"`, 1),
		"a leading zero":               strings.Replace(base, `"value":17`, `"value":07`, 1),
		"a leading zero in the max":    strings.Replace(base, `"max":20`, `"max":00`, 1),
		"the same frame":               base,
		"only the value, and harmless": strings.Replace(base, `"value":17`, `"value":18`, 1),
	} {
		t.Run(name, func(t *testing.T) { checkScanner(t, []byte(base), []byte(next)) })
	}
	// An escape's digits name another character: a kept frame with a
	// backslash is never compared against, so a key "\u0075ype" ("uype")
	// turned "\u0074ype" ("type") is read as the type it is.
	esc := `{"type":"progress","data":{"prompt_id":"p"},"\u0075ype":"x"}`
	checkScanner(t, []byte(esc), []byte(strings.Replace(esc, `0075`, `0074`, 1)))
	// A type with digits.
	typ := `{"type":"progress","data":{"prompt_id":"p"}}`
	checkScanner(t, []byte(`{"type":"progress_stat1","data":{"prompt_id":"p"}}`), []byte(typ))
	// The last member of a name counts, in the kept frame and after.
	dup := `{"type":"progress","data":{"node":"1","node":"2","prompt_id":"p"}}`
	checkScanner(t, []byte(dup), []byte(strings.Replace(dup, `"node":"2"`, `"node":"3"`, 1)))
}

// Whatever came before, a Scanner reads every frame as ScanEvent does:
// any two frames, and frames that differ from one before them in digits
// only (the case the Scanner reads without a scan).
func FuzzScanner(f *testing.F) {
	for _, e := range eventFrames {
		f.Add([]byte(e.frame), []byte(e.frame), []byte("0123456789"))
	}
	for _, b := range traceFrames(f) {
		f.Add(b, []byte(eventFrames[1].frame), []byte("99"))
	}
	f.Add([]byte(`{"type":"progress","data":{"value":10,"prompt_id":"1"}}`), []byte(`{"type":"progress","data":{"value":1,"prompt_id":"1"}}`), []byte("00"))
	f.Add([]byte(`{"type":"progress","data":{"v":1.05e+10,"s":"a1","prompt_id":"1"}}`), []byte(`[1]`), []byte("000000"))
	f.Add([]byte(`{"type":"progress","data":{"prompt_id":"p"},"\u0075ype":"x"}`), []byte(`{}`), []byte("00074"))
	f.Fuzz(func(t *testing.T, a, b, digits []byte) {
		checkScanner(t, a, b, withDigits(a, digits), withDigits(b, digits), a)
		checkScanner(t, a, withDigits(a, digits), withDigits(withDigits(a, digits), b))
	})
}

// BenchmarkScanSteps scans a stream of steps (a progress and a
// progress_state each, their value going up), with a Scanner and with a
// whole scan of every frame.
func BenchmarkScanSteps(b *testing.B) {
	var frames [][]byte
	size := 0
	for step := 10; step < 100; step++ {
		for _, f := range eventFrames[:2] {
			fr := []byte(strings.ReplaceAll(f.frame, `"value": 17`, fmt.Sprintf(`"value": %d`, step)))
			frames = append(frames, fr)
			size += len(fr)
		}
	}
	for _, c := range []struct {
		name string
		scan func() func([]byte) bool // a fresh reader of one stream
	}{
		{"scanner", func() func([]byte) bool {
			var s Scanner
			return func(fr []byte) bool { _, ok := s.Scan(fr); return ok }
		}},
		{"scan", func() func([]byte) bool {
			var last Head
			return func(fr []byte) bool { h, ok := ScanEventLike(fr, &last); last = h; return ok }
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			scan := c.scan()
			for b.Loop() {
				for _, fr := range frames {
					if !scan(fr) {
						b.Fatal("not ok")
					}
				}
			}
		})
	}
}
