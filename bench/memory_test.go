package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// BenchmarkIdleSocketMemory opens K idle browser WebSockets (K=2000, or
// $BENCH_SOCKETS) and reports how much Go heap and stack
// (HeapInuse+StackInuse after GC) the serving process holds per socket,
// its resident set size per socket (rss-B/socket: the Go memory plus what
// the runtime keeps mapped, but no kernel socket buffers), and how many
// goroutines:
//
//   - path=direct:                        a minimal gorilla/websocket server
//   - path=reverse_proxy:                 Caddy reverse_proxy to a home server
//   - path=comfyume-home-unreachable:     comfyume with nothing at its home URL
//   - path=comfyume-home-reachable:       comfyume relaying a live home server
//
// The browsers, and the home server of the reachable cases, run in two
// helper processes (this test binary re-executed with COMFYUME_BENCH_ROLE),
// so the measured process holds only the server side: nothing has to be
// subtracted. A proxy holds two sockets per browser (browser side and home
// side); both are counted, as both are the proxy's cost. Kernel socket
// buffers are not Go memory and are not counted. With
// BENCH_MEMPROFILE_DIR set, a heap profile of each case is written there
// while its sockets are open.
//
// These rows have no ns/op: each -count round measures once.
func BenchmarkIdleSocketMemory(b *testing.B) {
	k := 2000
	if v := os.Getenv("BENCH_SOCKETS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("BENCH_SOCKETS=%q", v)
		}
		k = n
	}
	limit := int(raiseFileLimit())
	// A proxy holds 2 descriptors per browser socket; keep some spare.
	kProxy := min(k, (limit-512)/2)
	kSingle := min(k, limit-512)
	if kProxy < k || kSingle < k {
		b.Logf("open files limit %d: proxied cases use %d sockets, others %d", limit, kProxy, kSingle)
	}

	direct, err := startFakeHome()
	if err != nil {
		b.Fatal(err)
	}
	defer direct.Close()
	homeChild := startChild(b, "home")
	homeAddr, err := homeChild.call("addr")
	if err != nil {
		b.Fatal(err)
	}
	fleet := startChild(b, "fleet")
	dead := freePort(b)
	ports := startCaddy(b, `{`+caddyGlobals+`
	comfyume {
		max_sockets_per_user 100000
		outputs disk {DATA}
	}
}

:{PORT:proxy} {
	bind 127.0.0.1
	reverse_proxy `+homeAddr+`
}

:{PORT:reachable} {
	bind 127.0.0.1
	comfyume {
		home http://`+homeAddr+`
	}
	reverse_proxy `+homeAddr+`
}

:{PORT:unreachable} {
	bind 127.0.0.1
	comfyume {
		home http://127.0.0.1:`+strconv.Itoa(dead)+`
	}
	reverse_proxy 127.0.0.1:`+strconv.Itoa(dead)+`
}
`)
	homeCount := func(want int) func() error {
		return func() error {
			deadline := time.Now().Add(60 * time.Second)
			for {
				s, err := homeChild.call("count")
				if err != nil {
					return err
				}
				if n, _ := strconv.Atoi(s); n >= want {
					return nil
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("home holds %s sockets, want %d", s, want)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}
	cases := []struct {
		name   string
		url    string
		k      int
		settle func() error
	}{
		{"path=direct", "ws://" + direct.Addr() + "/ws", kSingle, func() error {
			return waitFor(func() bool { return direct.open.Load() >= int64(kSingle) })
		}},
		{"path=reverse_proxy", fmt.Sprintf("ws://127.0.0.1:%d/ws", ports["proxy"]), kProxy, homeCount(kProxy)},
		{"path=comfyume-home-unreachable", fmt.Sprintf("ws://127.0.0.1:%d/ws", ports["unreachable"]), kSingle, nil},
		{"path=comfyume-home-reachable", fmt.Sprintf("ws://127.0.0.1:%d/ws", ports["reachable"]), kProxy, homeCount(kProxy)},
	}
	for _, c := range cases {
		var r idleResult
		b.Run(c.name, func(b *testing.B) {
			b.StopTimer()
			// The testing package calls this with b.N == 1 once per -count
			// round, then with larger b.N until its time budget is spent;
			// measure on the first call, only report on the others.
			if b.N == 1 {
				r = measureIdle(b, fleet, c.name, c.url, c.k, c.settle)
			}
			b.ReportMetric(r.perSocket, "B/socket")
			b.ReportMetric(r.heap, "heap-B/socket")
			b.ReportMetric(r.stack, "stack-B/socket")
			b.ReportMetric(r.rss, "rss-B/socket")
			b.ReportMetric(r.goroutines, "goroutines/socket")
			b.ReportMetric(float64(r.k), "sockets")
			b.ReportMetric(0, "ns/op")
		})
	}
}

type idleResult struct {
	perSocket, heap, stack, rss, goroutines float64
	k                                       int
}

// measureIdle has the fleet open k sockets to url and returns this
// process's growth per socket once they are idle.
func measureIdle(b *testing.B, fleet *child, name, url string, k int, settle func() error) idleResult {
	before := memNow()
	if _, err := fleet.call(fmt.Sprintf("open %s %d", url, k)); err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	if settle != nil {
		if err := settle(); err != nil {
			b.Fatalf("%s: %v", name, err)
		}
	}
	// Let handshakes, first home dials (and their failures) finish.
	time.Sleep(time.Second)
	after := memNow()
	if dir := os.Getenv("BENCH_MEMPROFILE_DIR"); dir != "" {
		writeHeapProfile(b, filepath.Join(dir, "idle-"+strings.TrimPrefix(name, "path=")+".pprof"))
	}
	per := func(a, b uint64) float64 { return float64(int64(a)-int64(b)) / float64(k) }
	r := idleResult{
		perSocket:  per(after.heap+after.stack, before.heap+before.stack),
		heap:       per(after.heap, before.heap),
		stack:      per(after.stack, before.stack),
		rss:        per(after.rss, before.rss),
		goroutines: float64(after.goroutines-before.goroutines) / float64(k),
		k:          k,
	}
	if _, err := fleet.call("close"); err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	// Wait for the server side to let go before the next case.
	if err := waitFor(func() bool { return runtime.NumGoroutine() <= before.goroutines+20 }); err != nil {
		b.Logf("%s: %d goroutines linger (baseline %d)", name, runtime.NumGoroutine(), before.goroutines)
	}
	return r
}

type memSample struct {
	heap, stack, rss uint64
	goroutines       int
}

// memNow is HeapInuse and StackInuse after two full collections (the
// second frees what the first only finalised), and the resident set size
// after freed memory went back to the OS.
func memNow() memSample {
	runtime.GC()
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSample{heap: ms.HeapInuse, stack: ms.StackInuse, rss: rssBytes(), goroutines: runtime.NumGoroutine()}
}

// rssBytes is this process's resident set size (/proc/self/statm), 0 where
// there is none.
func rssBytes() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseUint(f[1], 10, 64)
	return pages * uint64(os.Getpagesize())
}

func writeHeapProfile(tb testing.TB, path string) {
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		tb.Fatal(err)
	}
}

func waitFor(cond func() bool) error {
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// ---- helper processes ----

// child is this test binary re-executed in a helper role. It reads one
// command per line and answers "ok <value>" or "err <message>".
type child struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	mu    sync.Mutex
}

func startChild(tb testing.TB, role string) *child {
	tb.Helper()
	exe, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	if cpus := os.Getenv("BENCH_HELPER_CPUS"); cpus != "" {
		// The helper (load generator) on CPUs of its own: see
		// BENCHMARKS.md, "pinned".
		cmd = exec.Command("taskset", "-c", cpus, exe, "-test.run=^$")
	}
	cmd.Env = append(os.Environ(), roleEnv+"="+role)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	c := &child{cmd: cmd, in: in, lines: make(chan string, 16)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	tb.Cleanup(func() {
		_ = in.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	return c
}

func (c *child) call(command string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := io.WriteString(c.in, command+"\n"); err != nil {
		return "", err
	}
	select {
	case line, ok := <-c.lines:
		if !ok {
			return "", errors.New("helper process exited")
		}
		if v, ok := strings.CutPrefix(line, "ok "); ok {
			return v, nil
		}
		return "", errors.New(line)
	case <-time.After(5 * time.Minute):
		return "", errors.New("helper process does not answer " + command)
	}
}

// serveCommands answers commands read from in until it closes.
func serveCommands(in io.Reader, out io.Writer, handle func(args []string) (string, error)) int {
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		args := strings.Fields(sc.Text())
		if len(args) == 0 {
			continue
		}
		v, err := handle(args)
		if err != nil {
			fmt.Fprintf(out, "err %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
			continue
		}
		fmt.Fprintf(out, "ok %s\n", v)
	}
	return 0
}

// runHomeChild serves a fakeHome. Commands: addr, count.
func runHomeChild(in io.Reader, out io.Writer) int {
	h, err := startFakeHome()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer h.Close()
	return serveCommands(in, out, func(args []string) (string, error) {
		switch args[0] {
		case "addr":
			return h.Addr(), nil
		case "count":
			return strconv.FormatInt(h.open.Load(), 10), nil
		}
		return "", fmt.Errorf("unknown command %q", args[0])
	})
}

// runFleet plays K idle browsers. Commands: "open <ws url> <k>" opens k
// sockets (each waits for its first frame, then reads and answers pings
// until closed); "close" closes them all.
func runFleet(in io.Reader, out io.Writer) int {
	var (
		conns []*websocket.Conn
		gen   int
	)
	dialer := &websocket.Dialer{HandshakeTimeout: 30 * time.Second}
	return serveCommands(in, out, func(args []string) (string, error) {
		switch {
		case args[0] == "open" && len(args) == 3:
			k, err := strconv.Atoi(args[2])
			if err != nil {
				return "", err
			}
			gen++
			opened := make([]*websocket.Conn, k)
			var (
				next     atomic.Int64
				wg       sync.WaitGroup
				firstErr atomic.Value
			)
			for w := 0; w < 64; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						i := int(next.Add(1)) - 1
						if i >= k || firstErr.Load() != nil {
							return
						}
						url := fmt.Sprintf("%s?clientId=fleet%d-%d", args[1], gen, i)
						c, _, err := dialer.Dial(url, http.Header{})
						if err == nil {
							_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
							_, _, err = c.ReadMessage()
							_ = c.SetReadDeadline(time.Time{})
						}
						if err != nil {
							firstErr.CompareAndSwap(nil, fmt.Errorf("socket %d: %w", i, err))
							if c != nil {
								c.Close()
							}
							return
						}
						opened[i] = c
						go func() {
							for {
								if _, _, err := c.NextReader(); err != nil {
									return
								}
							}
						}()
					}
				}()
			}
			wg.Wait()
			for _, c := range opened {
				if c != nil {
					conns = append(conns, c)
				}
			}
			if err, _ := firstErr.Load().(error); err != nil {
				return "", err
			}
			return strconv.Itoa(len(conns)), nil
		case args[0] == "close":
			for _, c := range conns {
				c.Close()
			}
			conns = nil
			return "0", nil
		}
		return "", fmt.Errorf("unknown command %q", args)
	})
}
