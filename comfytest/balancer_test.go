package comfytest

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// lbGet is a GET through the balancer with optional headers.
func lbGet(t testing.TB, url string, hdr map[string]string) (int, string, http.Header) {
	t.Helper()
	resp, b := doReq(t, "GET", url, nil, hdr)
	return resp.StatusCode, string(b), resp.Header
}

// deviceName asks /system_stats which replica answered.
func deviceName(t testing.TB, base string, hdr map[string]string) string {
	t.Helper()
	code, body, _ := lbGet(t, base+"/system_stats", hdr)
	if code != 200 {
		t.Fatalf("GET /system_stats: %d %s", code, body)
	}
	var st struct {
		Devices []struct {
			Name string `json:"name"`
		} `json:"devices"`
	}
	if err := json.Unmarshal([]byte(body), &st); err != nil || len(st.Devices) == 0 {
		t.Fatalf("system_stats %q: %v", body, err)
	}
	return st.Devices[0].Name
}

// waitDone waits until the job has a history entry on that server (asked
// directly, not through the balancer).
func waitDone(t testing.TB, srv *Server, id string) map[string]any {
	t.Helper()
	var h map[string]any
	waitFor(t, "job "+id+" on "+srv.URL(), func() bool {
		h = nil
		getJSON(t, srv.URL()+"/history/"+id, &h)
		return len(h) > 0
	})
	return h[id].(map[string]any)
}

func replicasOf(rs []BalancedRequest) []int {
	out := make([]int, len(rs))
	for i, r := range rs {
		out[i] = r.Replica
	}
	return out
}

func lbDialWS(t testing.TB, base, clientID string, hdr http.Header) *wsClient {
	t.Helper()
	u := wsURL(base) + "?clientId=" + clientID
	c, resp, err := websocket.DefaultDialer.Dial(u, hdr)
	if err != nil {
		t.Fatalf("dial %s: %v (resp %v)", u, err, resp)
	}
	t.Cleanup(func() { c.Close() })
	return &wsClient{t: t, c: c}
}

// The failure from protocol §7: GET /history/{id} after POST /prompt lands
// on another replica and answers {} although the job ran (on the other
// one). Polling "works" every other time, /view likewise.
func TestBalancerHistoryOnOtherReplica(t *testing.T) {
	b := StartBalancer(t, BalancerOptions{Server: Options{StepDelay: time.Millisecond}})
	base := b.URL()

	id := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("lb", 3)})
	resp, body := doReq(t, "GET", base+"/history/"+id, nil, nil)
	if resp.StatusCode != 200 || string(body) != "{}" {
		t.Fatalf("GET /history/%s through the balancer: %d %s, want 200 {}", id, resp.StatusCode, body)
	}
	if ps := b.Replica(0).Prompts(); len(ps) != 1 || ps[0].PromptID != id {
		t.Fatalf("replica 0 prompts: %+v", ps)
	}
	if ps := b.Replica(1).Prompts(); len(ps) != 0 {
		t.Fatalf("replica 1 got prompts: %+v", ps)
	}
	// The job really ran, on replica 0.
	entry := waitDone(t, b.Replica(0), id)
	if st := entry["status"].(map[string]any)["status_str"]; st != "success" {
		t.Fatalf("job status %v", st)
	}
	img := entry["outputs"].(map[string]any)["2"].(map[string]any)["images"].([]any)[0].(map[string]any)
	filename := img["filename"].(string)

	// Polling alternates between the replica that has it and the one
	// that does not.
	var h map[string]any
	getJSON(t, base+"/history/"+id, &h) // replica 0
	if len(h) != 1 {
		t.Fatalf("poll on replica 0: %v", h)
	}
	h = nil
	getJSON(t, base+"/history/"+id, &h) // replica 1
	if len(h) != 0 {
		t.Fatalf("poll on replica 1: %v", h)
	}
	// /view of the output: found on 0, 404 on 1.
	view := base + "/view?filename=" + filename + "&type=output"
	if code, _, _ := lbGet(t, view, nil); code != 200 {
		t.Fatalf("/view on replica 0: %d", code)
	}
	if code, _, _ := lbGet(t, view, nil); code != 404 {
		t.Fatalf("/view on replica 1: %d", code)
	}
	if got, want := fmt.Sprint(replicasOf(b.Requests())), "[0 1 0 1 0 1]"; got != want {
		t.Fatalf("routing %s, want %s", got, want)
	}
	for _, r := range b.Requests() {
		if r.Status != 200 && !(r.Status == 404 && r.Path == "/view") {
			t.Fatalf("unexpected %+v", r)
		}
	}
}

// A WebSocket through the balancer and the POST /prompt for its client_id
// land on different replicas: the socket never hears of the job.
func TestBalancerWebSocketLandsElsewhere(t *testing.T) {
	b := StartBalancer(t, BalancerOptions{Server: Options{StepDelay: time.Millisecond}})
	base := b.URL()

	ws := dialWS(t, base, "me") // replica 0
	if f := ws.next(); f.typ != "status" {
		t.Fatalf("first frame %s", f.typ)
	}
	id := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("ws", 4), "client_id": "me"}) // replica 1
	ps := b.Replica(1).Prompts()
	if len(ps) != 1 || ps[0].PromptID != id || ps[0].ClientID != "me" {
		t.Fatalf("replica 1 prompts %+v", ps)
	}
	waitDone(t, b.Replica(1), id)

	// Nothing about the job reaches the socket on replica 0.
	_ = ws.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	for {
		_, data, err := ws.c.ReadMessage()
		if err != nil {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("ws read: %v", err)
			}
			break
		}
		if bytes.Contains(data, []byte(id)) {
			t.Fatalf("socket on replica 0 got an event of the job on replica 1: %s", data)
		}
	}
	rs := b.Requests()
	if len(rs) != 2 || !rs[0].WebSocket || rs[0].Replica != 0 || rs[0].Status != 101 || rs[0].Path != "/ws" ||
		rs[1].WebSocket || rs[1].Replica != 1 || rs[1].Method != "POST" || rs[1].Path != "/prompt" {
		t.Fatalf("requests %+v", rs)
	}
}

// With one replica, the plain multi-request conversation works through
// the balancer, proxied WebSocket, token and prefix included.
func TestBalancerSingleReplicaConversation(t *testing.T) {
	b := StartBalancer(t, BalancerOptions{
		Replicas:   1,
		Server:     Options{StepDelay: time.Millisecond, Version: "2026"},
		Token:      "tok",
		PathPrefix: "/my-deployment",
	})
	base := b.URL()
	if !strings.HasSuffix(base, "/my-deployment") {
		t.Fatalf("URL %s", base)
	}
	auth := map[string]string{"Authorization": "Bearer tok"}
	ws := lbDialWS(t, base, "c1", http.Header{"Authorization": {"Bearer tok"}})
	ws.next()
	resp, body := doReq(t, "POST", base+"/prompt", bytes.NewReader(mustJSON(map[string]any{"prompt": simpleWorkflow("one", 7), "client_id": "c1"})), auth)
	if resp.StatusCode != 200 {
		t.Fatalf("POST /prompt: %d %s", resp.StatusCode, body)
	}
	var pr struct {
		PromptID string `json:"prompt_id"`
	}
	_ = json.Unmarshal(body, &pr)
	fs := ws.untilDone(pr.PromptID)
	if tp := types(fs); !contains(tp, "executed") || !contains(tp, "execution_success") {
		t.Fatalf("ws frames %v", tp)
	}
	code, hist, _ := lbGet(t, base+"/history/"+pr.PromptID, auth)
	if code != 200 || !strings.Contains(hist, "one_00001_.png") {
		t.Fatalf("history: %d %s", code, hist)
	}
	want, ok := b.Replica(0).OutputFile("output", "", "one_00001_.png")
	if !ok {
		t.Fatal("no output on replica")
	}
	resp, got := doReq(t, "GET", base+"/view?filename=one_00001_.png&type=output", nil, auth)
	if resp.StatusCode != 200 || !bytes.Equal(got, want) {
		t.Fatalf("/view: %d, %d bytes (want %d)", resp.StatusCode, len(got), len(want))
	}
}

func TestBalancerTokenPrefixAndEscapes(t *testing.T) {
	b := StartBalancer(t, BalancerOptions{
		Replicas:   1,
		Server:     Options{StepDelay: time.Millisecond},
		Token:      "s3cret",
		PathPrefix: "my-deployment/", // normalised to /my-deployment
	})
	base := b.URL()
	host := strings.TrimSuffix(base, "/my-deployment")
	auth := map[string]string{"Authorization": "Bearer s3cret"}

	code, _, hdr := lbGet(t, base+"/system_stats", nil)
	if code != 401 || !strings.HasPrefix(hdr.Get("WWW-Authenticate"), "Bearer") {
		t.Fatalf("no token: %d %v", code, hdr)
	}
	if code, _, _ := lbGet(t, base+"/system_stats", map[string]string{"Authorization": "Bearer nope"}); code != 401 {
		t.Fatalf("wrong token: %d", code)
	}
	if code, _, _ := lbGet(t, base+"/system_stats", map[string]string{"Authorization": "s3cret"}); code != 401 {
		t.Fatalf("token without Bearer: %d", code)
	}
	if _, resp, err := websocket.DefaultDialer.Dial(wsURL(base), nil); err == nil || resp == nil || resp.StatusCode != 401 {
		t.Fatalf("WS without token: %v %v", err, resp)
	}
	if n := len(b.Replica(0).Requests()); n != 0 {
		t.Fatalf("replica saw %d unauthorised requests", n)
	}

	if name := deviceName(t, base, auth); name != "replica-0" {
		t.Fatalf("device %q", name)
	}
	rr := b.Replica(0).Requests()
	if last := rr[len(rr)-1]; last.Path != "/system_stats" || last.Header.Get("Authorization") != "" {
		t.Fatalf("forwarded %+v", last)
	}
	if last := rr[len(rr)-1]; last.Header.Get("X-Forwarded-For") == "" {
		t.Fatalf("no X-Forwarded-For: %v", last.Header)
	}
	// Outside the prefix.
	if code, _, _ := lbGet(t, host+"/other-deployment/system_stats", auth); code != 404 {
		t.Fatalf("other prefix: %d", code)
	}
	if code, _, _ := lbGet(t, host+"/my-deployment-2/system_stats", auth); code != 404 {
		t.Fatalf("prefix as a name prefix: %d", code)
	}
	// The bare prefix is the replica's "/".
	if code, body, _ := lbGet(t, base, auth); code != 200 || !strings.Contains(body, "comfytest fake ComfyUI") {
		t.Fatalf("root: %d %s", code, body)
	}

	// %2F stays escaped: the userdata route only matches with it.
	resp, body := doReq(t, "POST", base+"/api/userdata/workflows%2Fa.json", strings.NewReader(`{"x":1}`), auth)
	if resp.StatusCode != 200 || string(body) != `"workflows/a.json"` {
		t.Fatalf("POST userdata: %d %s", resp.StatusCode, body)
	}
	resp, body = doReq(t, "GET", base+"/api/userdata/workflows%2Fa.json", nil, auth)
	if resp.StatusCode != 200 || string(body) != `{"x":1}` {
		t.Fatalf("GET userdata: %d %s", resp.StatusCode, body)
	}
	rr = b.Replica(0).Requests()
	if last := rr[len(rr)-1]; last.Path != "/api/userdata/workflows%2Fa.json" {
		t.Fatalf("replica saw %q", last.Path)
	}

	var paths []string
	for _, r := range b.Requests() {
		paths = append(paths, fmt.Sprintf("%d %d %s", r.Replica, r.Status, r.Path))
	}
	want := []string{
		"-1 401 /system_stats", "-1 401 /system_stats", "-1 401 /system_stats", "-1 401 /ws",
		"0 200 /system_stats",
		"-1 404 /other-deployment/system_stats", "-1 404 /my-deployment-2/system_stats",
		"0 200 /",
		"0 200 /api/userdata/workflows%2Fa.json", "0 200 /api/userdata/workflows%2Fa.json",
	}
	if strings.Join(paths, "\n") != strings.Join(want, "\n") {
		t.Fatalf("requests:\n%s\nwant:\n%s", strings.Join(paths, "\n"), strings.Join(want, "\n"))
	}
}

func TestBalancerColdStartAfterRestart(t *testing.T) {
	const cold = 300 * time.Millisecond
	b := StartBalancer(t, BalancerOptions{Replicas: 1, ColdStart: cold, Server: Options{StepDelay: time.Millisecond}})
	base := b.URL()
	if s := b.State(0); s != "ready" {
		t.Fatalf("initial state %s", s)
	}
	id := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("cs", 1)})
	waitDone(t, b.Replica(0), id)
	old := b.Replica(0)

	t0 := time.Now()
	b.Restart(0)
	if b.Replica(0) == old {
		t.Fatal("Restart kept the old server")
	}
	if s := b.State(0); s != "starting" {
		t.Fatalf("state after Restart %s", s)
	}
	code, body, hdr := lbGet(t, base+"/system_stats", nil)
	if code != 503 || hdr.Get("Retry-After") != "1" || !strings.Contains(body, "starting") {
		t.Fatalf("during cold start: %d %q %v", code, body, hdr)
	}
	n503 := 1
	for {
		code, _, _ := lbGet(t, base+"/system_stats", nil)
		if code == 200 {
			break
		}
		if code != 503 {
			t.Fatalf("during cold start: %d", code)
		}
		n503++
		time.Sleep(20 * time.Millisecond)
	}
	if el := time.Since(t0); el < cold {
		t.Fatalf("ready after %v < %v", el, cold)
	}
	if s := b.State(0); s != "ready" {
		t.Fatalf("state %s", s)
	}
	// The 503s never reached the fresh replica, and it has empty state.
	if rr := b.Replica(0).Requests(); len(rr) != 1 {
		t.Fatalf("fresh replica saw %d requests", len(rr))
	}
	resp, h := doReq(t, "GET", base+"/history/"+id, nil, nil)
	if resp.StatusCode != 200 || string(h) != "{}" {
		t.Fatalf("history after restart: %d %s", resp.StatusCode, h)
	}
	if _, ok := b.Replica(0).OutputFile("output", "", "cs_00001_.png"); ok {
		t.Fatal("output survived the restart")
	}
	if _, ok := old.OutputFile("output", "", "cs_00001_.png"); !ok {
		t.Fatal("old incarnation lost its introspection")
	}
	var got503 int
	for _, r := range b.Requests() {
		if r.Status == 503 {
			got503++
		}
	}
	if got503 != n503 {
		t.Fatalf("recorded %d 503s, saw %d", got503, n503)
	}
}

func TestBalancerScaleToZero(t *testing.T) {
	const cold = 200 * time.Millisecond
	b := StartBalancer(t, BalancerOptions{Replicas: 2, ColdStart: cold, Server: Options{StepDelay: time.Millisecond}})
	base := b.URL()
	ws := dialWS(t, base, "z") // replica 0
	ws.next()

	b.ScaleToZero()
	if b.State(0) != "zero" || b.State(1) != "zero" {
		t.Fatalf("states %s %s", b.State(0), b.State(1))
	}
	_ = ws.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := ws.c.ReadMessage(); err == nil {
		t.Fatal("proxied socket survived scale to zero")
	}

	start := len(b.Requests())
	t0 := time.Now()
	if code, _, _ := lbGet(t, base+"/system_stats", nil); code != 503 {
		t.Fatalf("first request from zero: %d", code)
	}
	if b.State(0) != "starting" || b.State(1) != "zero" {
		t.Fatalf("states %s %s", b.State(0), b.State(1))
	}
	waitFor(t, "scale from zero", func() bool {
		code, _, _ := lbGet(t, base+"/system_stats", nil)
		return code == 200
	})
	if el := time.Since(t0); el < cold {
		t.Fatalf("ready after %v", el)
	}
	// Only replica 0 came back; everything goes there.
	for i := 0; i < 4; i++ {
		if name := deviceName(t, base, nil); name != "replica-0" {
			t.Fatalf("served by %s", name)
		}
	}
	for _, r := range b.Requests()[start:] {
		if r.Replica != 0 {
			t.Fatalf("routed to %d after scale from zero", r.Replica)
		}
	}

	// Bringing replica 1 back: it cold-starts while 0 serves.
	b.Restart(1)
	var got []int
	for i := 0; i < 4; i++ {
		code, _, _ := lbGet(t, base+"/system_stats", nil)
		got = append(got, code)
	}
	if fmt.Sprint(got) != "[200 503 200 503]" && fmt.Sprint(got) != "[503 200 503 200]" {
		t.Fatalf("with replica 1 starting: %v", got)
	}
}

func TestBalancerHoldColdStart(t *testing.T) {
	const cold = 200 * time.Millisecond
	b := StartBalancer(t, BalancerOptions{Replicas: 1, ColdStart: cold, HoldColdStart: true, Server: Options{StepDelay: time.Millisecond}})
	base := b.URL()
	b.ScaleToZero()
	t0 := time.Now()
	if name := deviceName(t, base, nil); name != "replica-0" {
		t.Fatalf("served by %s", name)
	}
	if el := time.Since(t0); el < cold {
		t.Fatalf("held request answered after %v < %v", el, cold)
	}

	// A held request whose replica dies during its cold start gets 502.
	b = StartBalancer(t, BalancerOptions{Replicas: 1, ColdStart: time.Minute, HoldColdStart: true, Server: Options{StepDelay: time.Millisecond}})
	base = b.URL()
	b.Restart(0)
	n := len(b.Requests())
	done := make(chan int, 1)
	go func() {
		resp, err := http.Get(base + "/system_stats")
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	waitFor(t, "held request", func() bool { return len(b.Requests()) > n })
	b.Kill(0)
	if code := <-done; code != 502 {
		t.Fatalf("held request after Kill: %d", code)
	}
}

func TestBalancerKill(t *testing.T) {
	b := StartBalancer(t, BalancerOptions{Replicas: 2, Server: Options{StepDelay: time.Millisecond}})
	base := b.URL()
	ws := dialWS(t, base, "k") // replica 0
	ws.next()
	b.Kill(0)
	if b.State(0) != "dead" {
		t.Fatalf("state %s", b.State(0))
	}
	_ = ws.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := ws.c.ReadMessage(); err == nil || websocket.IsCloseError(err, websocket.CloseGoingAway) {
		t.Fatalf("socket after Kill: %v", err)
	}
	var codes []int
	for i := 0; i < 4; i++ {
		code, _, _ := lbGet(t, base+"/system_stats", nil)
		codes = append(codes, code)
	}
	if fmt.Sprint(codes) != "[200 502 200 502]" {
		t.Fatalf("with replica 0 dead: %v", codes)
	}
	for _, r := range b.Requests()[1:] {
		if (r.Replica == 0) != (r.Status == 502) {
			t.Fatalf("%+v", r)
		}
	}
	b.Restart(0) // ColdStart 0: ready at once
	for i := 0; i < 4; i++ {
		deviceName(t, base, nil)
	}
	if len(b.Replica(0).Requests()) != 2 {
		t.Fatalf("fresh replica 0 saw %d requests", len(b.Replica(0).Requests()))
	}
}

// sseHandler streams one event, waits for release, then streams more; other
// paths go to ComfyUI.
func sseHandler(release <-chan struct{}) func(int, *Server) http.Handler {
	return func(i int, comfy *Server) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/stream" {
				comfy.Handler().ServeHTTP(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/event-stream")
			rc := http.NewResponseController(w)
			fmt.Fprintf(w, "data: replica %d event 0\n\n", i)
			_ = rc.Flush()
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
			for k := 1; k < 5; k++ {
				fmt.Fprintf(w, "data: replica %d event %d\n\n", i, k)
				_ = rc.Flush()
			}
		})
	}
}

func readEvent(t testing.TB, br *bufio.Reader) string {
	t.Helper()
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("stream read: %v", err)
	}
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatalf("stream read: %v", err)
	}
	return strings.TrimSpace(strings.TrimPrefix(line, "data:"))
}

// One streaming request is served by one replica from start to end, and
// passes through unbuffered, while other requests keep rotating.
func TestBalancerStreamStaysOnOneReplica(t *testing.T) {
	release := make(chan struct{})
	b := StartBalancer(t, BalancerOptions{Replicas: 2, Server: Options{StepDelay: time.Millisecond}, ExtraHandler: sseHandler(release)})
	base := b.URL()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(base + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	// The first event arrives before the handler may continue: no
	// buffering in the balancer.
	if ev := readEvent(t, br); ev != "replica 0 event 0" {
		t.Fatalf("first event %q", ev)
	}
	// Meanwhile other requests go round.
	var names []string
	for i := 0; i < 3; i++ {
		names = append(names, deviceName(t, base, nil))
	}
	if fmt.Sprint(names) != "[replica-1 replica-0 replica-1]" {
		t.Fatalf("others served by %v", names)
	}
	close(release)
	for k := 1; k < 5; k++ {
		if ev := readEvent(t, br); ev != fmt.Sprintf("replica 0 event %d", k) {
			t.Fatalf("event %d: %q", k, ev)
		}
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after the stream: %v", err)
	}
	rs := b.Requests()
	if rs[0].Path != "/stream" || rs[0].Replica != 0 || rs[0].Status != 200 {
		t.Fatalf("%+v", rs[0])
	}
}

// Kill drops an in-flight stream.
func TestBalancerKillDropsStream(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	b := StartBalancer(t, BalancerOptions{Replicas: 2, Server: Options{StepDelay: time.Millisecond}, ExtraHandler: sseHandler(release)})
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(b.URL() + "/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if ev := readEvent(t, br); ev != "replica 0 event 0" {
		t.Fatalf("first event %q", ev)
	}
	b.Kill(0)
	if _, err := io.ReadAll(br); err == nil {
		t.Fatal("stream ended cleanly although its replica was killed")
	}
}

// What works behind a non-sticky balancer: one request that carries the
// whole job (a worker in the container queues it on its own ComfyUI,
// waits, and returns the outputs in the same, streamed, response).
func TestBalancerWorkerRequestCarriesWholeJob(t *testing.T) {
	worker := func(i int, comfy *Server) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/run" {
				comfy.Handler().ServeHTTP(w, r)
				return
			}
			body, _ := io.ReadAll(r.Body)
			resp, err := http.Post(comfy.URL()+"/prompt", "application/json", bytes.NewReader(body))
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			var pr struct {
				PromptID string `json:"prompt_id"`
			}
			_ = json.NewDecoder(resp.Body).Decode(&pr)
			resp.Body.Close()
			w.Header().Set("Content-Type", "application/x-ndjson")
			enc := json.NewEncoder(w)
			rc := http.NewResponseController(w)
			_ = enc.Encode(map[string]any{"status": "queued", "prompt_id": pr.PromptID, "replica": i})
			_ = rc.Flush()
			for {
				var h map[string]map[string]any
				resp, err := http.Get(comfy.URL() + "/history/" + pr.PromptID)
				if err != nil {
					return
				}
				_ = json.NewDecoder(resp.Body).Decode(&h)
				resp.Body.Close()
				if e, ok := h[pr.PromptID]; ok {
					img := e["outputs"].(map[string]any)["2"].(map[string]any)["images"].([]any)[0].(map[string]any)
					data, _ := comfy.OutputFile("output", "", img["filename"].(string))
					_ = enc.Encode(map[string]any{"status": "done", "filename": img["filename"], "data": base64.StdEncoding.EncodeToString(data)})
					return
				}
				_ = enc.Encode(map[string]any{"status": "running"})
				_ = rc.Flush()
				select {
				case <-r.Context().Done():
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		})
	}
	var lmu sync.Mutex
	var logs []string
	logf := func(f string, a ...any) {
		lmu.Lock()
		logs = append(logs, time.Now().Format("15:04:05.000000 ")+fmt.Sprintf(f, a...))
		lmu.Unlock()
	}
	defer func() {
		if t.Failed() {
			lmu.Lock()
			t.Log(strings.Join(logs, "\n"))
			lmu.Unlock()
		}
	}()
	b := StartBalancer(t, BalancerOptions{Replicas: 2, Server: Options{StepDelay: 5 * time.Millisecond, Logf: logf}, ExtraHandler: worker})
	var wg sync.WaitGroup
	results := make([]map[string]any, 2)
	errs := make([]error, 2)
	for j := 0; j < 2; j++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := mustJSON(map[string]any{"prompt": simpleWorkflow(fmt.Sprintf("job%d", j), 10*j)})
			resp, err := http.Post(b.URL()+"/run", "application/json", bytes.NewReader(body))
			if err != nil {
				errs[j] = err
				return
			}
			defer resp.Body.Close()
			dec := json.NewDecoder(resp.Body)
			for {
				var m map[string]any
				if err := dec.Decode(&m); err != nil {
					errs[j] = fmt.Errorf("stream ended before done: %v", err)
					return
				}
				if m["status"] == "done" {
					results[j] = m
					return
				}
			}
		}()
	}
	wg.Wait()
	for j := 0; j < 2; j++ {
		if errs[j] != nil {
			t.Fatalf("job %d: %v", j, errs[j])
		}
		data, _ := base64.StdEncoding.DecodeString(results[j]["data"].(string))
		if !bytes.HasPrefix(data, []byte("\x89PNG")) {
			t.Fatalf("job %d: no PNG", j)
		}
	}
	// The two jobs ran on different replicas, each entirely on one.
	rs := b.Requests()
	if len(rs) != 2 || rs[0].Replica == rs[1].Replica {
		t.Fatalf("requests %+v", rs)
	}
	if len(b.Replica(0).Prompts()) != 1 || len(b.Replica(1).Prompts()) != 1 {
		t.Fatal("each replica should have run one job")
	}
}

func TestBalancerRandomPolicy(t *testing.T) {
	b := StartBalancer(t, BalancerOptions{Replicas: 2, Policy: "random", Server: Options{StepDelay: time.Millisecond}})
	seen := map[string]int{}
	for i := 0; i < 40; i++ {
		seen[deviceName(t, b.URL(), nil)]++
	}
	if seen["replica-0"] == 0 || seen["replica-1"] == 0 {
		t.Fatalf("random routing: %v", seen)
	}
}
