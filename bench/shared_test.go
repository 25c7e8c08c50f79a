package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/valkey-io/valkey-go"
)

// Helpers of the shared-state benchmarks (BenchmarkPromptOverhead,
// BenchmarkReplicaFanout, BenchmarkViewS3). They need a Valkey and an S3
// server, whose addresses scripts/services/valkey.sh and s3.sh export;
// without them the benchmarks skip. Every run uses its own random key
// prefix, in Valkey and in the bucket, and deletes it at the end.

// sharedGlobals are caddyGlobals with the error log in a file of the
// config's {DATA} directory: a log line on stderr in the middle of a
// benchmark's result line would spoil it for benchstat.
const sharedGlobals = `
	admin off
	persist_config off
	log {
		output file {DATA}/errors.log
		level ERROR
	}
`

// sharedServers are the Valkey and S3 servers from the environment.
type sharedServers struct {
	valkey                                         string
	s3Endpoint, s3AccessKey, s3SecretKey, s3Bucket string
}

func needShared(tb testing.TB) sharedServers {
	tb.Helper()
	s := sharedServers{
		valkey:      os.Getenv("COMFYUME_TEST_VALKEY"),
		s3Endpoint:  os.Getenv("COMFYUME_TEST_S3_ENDPOINT"),
		s3AccessKey: os.Getenv("COMFYUME_TEST_S3_ACCESS_KEY"),
		s3SecretKey: os.Getenv("COMFYUME_TEST_S3_SECRET_KEY"),
		s3Bucket:    os.Getenv("COMFYUME_TEST_S3_BUCKET"),
	}
	if s.valkey == "" || s.s3Endpoint == "" {
		tb.Skip("needs Valkey and S3: COMFYUME_TEST_VALKEY / COMFYUME_TEST_S3_* (see BENCHMARKS.md, \"Shared state\")")
	}
	return s
}

// newPrefix is a fresh key prefix ("bench<hex>:") for one benchmark run.
// The Valkey keys and S3 objects under it are deleted when tb ends.
func (s sharedServers) newPrefix(tb testing.TB) string {
	tb.Helper()
	var r [6]byte
	_, _ = rand.Read(r[:])
	prefix := "bench" + hex.EncodeToString(r[:]) + ":"
	tb.Cleanup(func() { s.dropPrefix(tb, prefix) })
	return prefix
}

// storeValkey is the Caddyfile `store` option for prefix.
func (s sharedServers) storeValkey(prefix string) string {
	return `store valkey {
			address ` + s.valkey + `
			prefix ` + prefix + `
		}`
}

// outputsS3 is the Caddyfile `outputs` option for prefix; serve is
// "proxy" or "redirect".
func (s sharedServers) outputsS3(prefix, serve string) string {
	return `outputs s3 {
			endpoint http://` + s.s3Endpoint + `
			bucket ` + s.s3Bucket + `
			prefix ` + prefix + `
			access_key ` + s.s3AccessKey + `
			secret_key ` + s.s3SecretKey + `
			region us-east-1
			spool {DATA}/spool
			serve ` + serve + `
		}`
}

func (s sharedServers) valkeyClient(tb testing.TB) valkey.Client {
	tb.Helper()
	// The gateway's own options (caddymodule/backends.go) where they matter.
	c, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{s.valkey}, ForceSingleClient: true, DisableRetry: true})
	if err != nil {
		tb.Fatalf("valkey %s: %v", s.valkey, err)
	}
	return c
}

func (s sharedServers) s3Client(tb testing.TB) *minio.Client {
	tb.Helper()
	c, err := minio.New(s.s3Endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(s.s3AccessKey, s.s3SecretKey, ""),
		Region: "us-east-1",
	})
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// dropPrefix deletes every Valkey key and S3 object under prefix.
func (s sharedServers) dropPrefix(tb testing.TB, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vc := s.valkeyClient(tb)
	defer vc.Close()
	var cursor uint64
	for {
		e, err := vc.Do(ctx, vc.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
		if err != nil {
			tb.Logf("scanning Valkey keys %s*: %v", prefix, err)
			break
		}
		if len(e.Elements) > 0 {
			_ = vc.Do(ctx, vc.B().Unlink().Key(e.Elements...).Build()).Error()
		}
		if cursor = e.Cursor; cursor == 0 {
			break
		}
	}
	sc := s.s3Client(tb)
	objs := sc.ListObjects(ctx, s.s3Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true})
	for e := range sc.RemoveObjects(ctx, s.s3Bucket, objs, minio.RemoveObjectsOptions{}) {
		tb.Logf("removing %s: %v", e.ObjectName, e.Err)
	}
}

// ---- comfyume in its own process ----

// buildComfyume builds ./cmd/comfyume (Caddy with the comfyume module)
// into a directory removed when tb ends. The go build cache makes every
// build after the first a link of a few seconds.
func buildComfyume(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "comfyume")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/comfyume").CombinedOutput(); err != nil {
		tb.Fatalf("go build ../cmd/comfyume: %v\n%s", err, out)
	}
	return bin
}

// proc is a comfyume (Caddy) server running as a child process.
type proc struct {
	cmd  *exec.Cmd
	base string // http://127.0.0.1:<port>
	mu   sync.Mutex
	logs bytes.Buffer
}

// startProc runs bin with caddyfile, where "{PORT}" becomes a free port
// (the one base points at) and "{DATA}" a fresh directory. The process is
// killed when tb ends; its log is shown if tb failed.
func startProc(tb testing.TB, bin, caddyfile string) *proc {
	tb.Helper()
	port := freePort(tb)
	dir := tb.TempDir()
	cf := strings.ReplaceAll(strings.ReplaceAll(caddyfile, "{PORT}", strconv.Itoa(port)), "{DATA}", dir)
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cf), 0o600); err != nil {
		tb.Fatal(err)
	}
	p := &proc{base: fmt.Sprintf("http://127.0.0.1:%d", port)}
	p.cmd = exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
	p.cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	pr, pw, err := os.Pipe()
	if err != nil {
		tb.Fatal(err)
	}
	p.cmd.Stdout, p.cmd.Stderr = pw, pw
	if err := p.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	pw.Close()
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			if p.logs.Len() < 1<<20 {
				p.logs.WriteString(sc.Text() + "\n")
			}
			p.mu.Unlock()
		}
	}()
	tb.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		_ = p.cmd.Wait()
		if tb.Failed() {
			tb.Logf("comfyume process log:\n%s", p.log())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 100*time.Millisecond)
		if err == nil {
			c.Close()
			return p
		}
		if time.Now().After(deadline) || p.cmd.ProcessState != nil {
			tb.Fatalf("comfyume process did not start:\n%s", p.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *proc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// cpu is the CPU time (user+system) the process has used so far, from
// /proc/<pid>/stat (in clock ticks of 10 ms: only meaningful summed over
// many operations).
func (p *proc) cpu() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	// Fields 14 and 15 of stat (utime, stime); f[0] is field 3.
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// ---- browser side ----

// jobWatcher is a browser WebSocket that reports the end of every job
// whose events it gets.
type jobWatcher struct {
	conn   *websocket.Conn
	events chan jobEvent
}

type jobEvent struct {
	typ, promptID string
	queue         int // queue_remaining of a status frame
}

// watchJobs opens a browser socket to wsURL as user ("" = no X-User
// header). It is closed when tb ends, or by close.
func watchJobs(tb testing.TB, wsURL, user string) *jobWatcher {
	tb.Helper()
	h := http.Header{}
	if user != "" {
		h.Set("X-User", user)
	}
	c, _, err := websocket.DefaultDialer.Dial(wsURL, h)
	if err != nil {
		tb.Fatalf("dial %s: %v", wsURL, err)
	}
	w := &jobWatcher{conn: c, events: make(chan jobEvent, 1024)}
	tb.Cleanup(func() { c.Close() })
	go func() {
		defer close(w.events)
		for {
			typ, m, err := c.ReadMessage()
			if err != nil {
				return
			}
			if typ != websocket.TextMessage {
				continue
			}
			var h struct {
				Type string `json:"type"`
				Data struct {
					PromptID string `json:"prompt_id"`
					Status   struct {
						ExecInfo struct {
							QueueRemaining int `json:"queue_remaining"`
						} `json:"exec_info"`
					} `json:"status"`
				} `json:"data"`
			}
			if json.Unmarshal(m, &h) != nil {
				continue
			}
			if isJobEnd(h.Type) || h.Type == "status" {
				select {
				case w.events <- jobEvent{h.Type, h.Data.PromptID, h.Data.Status.ExecInfo.QueueRemaining}:
				default: // nobody waits for this many
				}
			}
		}
	}()
	return w
}

func (w *jobWatcher) close() { w.conn.Close() }

// wait returns when the job id has ended and, after that, a status frame
// said the queue is empty: the server is done with the job (for comfyume:
// outputs captured, record saved, queue counts sent), so the next request
// meets an idle server.
func (w *jobWatcher) wait(id string, d time.Duration) error {
	timeout := time.After(d)
	ended := false
	for {
		select {
		case e, ok := <-w.events:
			if !ok {
				return fmt.Errorf("socket closed while waiting for job %s", id)
			}
			if isJobEnd(e.typ) && e.promptID == id {
				ended = true
			}
			if ended && e.typ == "status" && e.queue == 0 {
				return nil
			}
		case <-timeout:
			return fmt.Errorf("job %s did not end (ended=%v) within %v", id, ended, d)
		}
	}
}

func isJobEnd(t string) bool {
	return t == "execution_success" || t == "execution_error" || t == "execution_interrupted"
}

// postPrompt sends a prepared POST /api/prompt body as user ("" = no
// X-User header) and returns the prompt_id of the answer.
func postPrompt(client *http.Client, base, user string, body []byte) (string, error) {
	req, err := http.NewRequest("POST", base+"/api/prompt", bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	if user != "" {
		req.Header.Set("X-User", user)
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var a struct {
		PromptID string `json:"prompt_id"`
	}
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	if resp.StatusCode != 200 || json.Unmarshal(buf.Bytes(), &a) != nil || a.PromptID == "" {
		return "", fmt.Errorf("POST %s/api/prompt: %d %.300s", base, resp.StatusCode, buf.Bytes())
	}
	return a.PromptID, nil
}

// quantileMs is the q-quantile of sorted durations in ns, in ms.
func quantileMs(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return float64(sorted[int(q*float64(len(sorted)-1))]) / 1e6
}
