package comfytest

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func asyncDo(t *testing.T, method, u string, body string, h map[string]string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func TestAsyncPlatform(t *testing.T) {
	release := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.URL.Query().Get("hold") != "" {
			<-release
		}
		w.Header().Set("Content-Type", "application/x-test")
		w.Header().Set("X-Dropped", "1")
		w.WriteHeader(201)
		_, _ = io.WriteString(w, r.Method+" "+r.URL.EscapedPath()+" prefer="+r.Header.Get("Prefer")+
			" auth="+r.Header.Get("Authorization")+" body="+string(b))
	}))
	t.Cleanup(backend.Close)
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before backend.Close, which waits for the held handler
	p := StartAsyncPlatformWith(t, AsyncPlatformOptions{Backend: backend.URL + "/base", Deployment: "my-dep", Token: "k"})
	auth := map[string]string{"Authorization": "Bearer k"}

	// Token required, everywhere.
	if resp, _ := asyncDo(t, "GET", p.DeploymentURL()+"/x", "", nil); resp.StatusCode != 401 {
		t.Fatalf("no token: %d", resp.StatusCode)
	}
	// Synchronous passthrough, escaped path kept, Authorization consumed.
	resp, body := asyncDo(t, "POST", p.DeploymentURL()+"/a%2Fb/c", "hi", map[string]string{"Authorization": "Bearer k", "Prefer": "wait=5"})
	if resp.StatusCode != 201 || body != "POST /base/a%2Fb/c prefer=wait=5 auth= body=hi" {
		t.Fatalf("sync: %d %q", resp.StatusCode, body)
	}
	// Outside the deployment.
	if resp, _ := asyncDo(t, "GET", p.URL()+"/other/x", "", auth); resp.StatusCode != 404 {
		t.Fatalf("other deployment: %d", resp.StatusCode)
	}

	// Asynchronous.
	h := map[string]string{"Authorization": "Bearer k", "Prefer": "respond-async"}
	resp, body = asyncDo(t, "POST", p.DeploymentURL()+"/run?hold=1", "job", h)
	var acc struct{ Id, StatusPath, ResultPath string }
	if err := json.Unmarshal([]byte(body), &acc); err != nil || resp.StatusCode != 202 || acc.Id == "" ||
		acc.StatusPath != "/status/my-dep" || acc.ResultPath != "/result/my-dep" ||
		resp.Header.Get("X-Inference-Id") != acc.Id || resp.Header.Get("Location") != "/result/my-dep" {
		t.Fatalf("submit: %d %s %v", resp.StatusCode, body, resp.Header)
	}
	if body != `{"Id":"`+acc.Id+`","StatusPath":"/status/my-dep","ResultPath":"/result/my-dep"}` {
		t.Fatalf("field order: %s", body)
	}
	withID := map[string]string{"Authorization": "Bearer k", "X-Inference-Id": acc.Id}
	status := func() string {
		resp, body := asyncDo(t, "GET", p.URL()+acc.StatusPath, "", withID)
		var st struct{ Id, Status string }
		if resp.StatusCode != 200 || json.Unmarshal([]byte(body), &st) != nil || st.Id != acc.Id {
			t.Fatalf("status: %d %s", resp.StatusCode, body)
		}
		return st.Status
	}
	deadline := time.Now().Add(5 * time.Second)
	for status() != "Inference" {
		if time.Now().After(deadline) {
			t.Fatal("never Inference")
		}
		time.Sleep(time.Millisecond)
	}
	if resp, body := asyncDo(t, "GET", p.ResultURL(), "", withID); resp.StatusCode != http.StatusTooEarly || !strings.Contains(body, `"Status":"Inference"`) {
		t.Fatalf("early result: %d %s", resp.StatusCode, body)
	}
	unblock()
	for status() != "Completed" {
		if time.Now().After(deadline) {
			t.Fatal("never Completed")
		}
		time.Sleep(time.Millisecond)
	}
	for range 2 { // the result can be fetched again
		resp, body = asyncDo(t, "GET", p.ResultURL(), "", withID)
		if resp.StatusCode != 201 || body != "POST /base/run prefer= auth= body=job" ||
			resp.Header.Get("Content-Type") != "application/x-test" || resp.Header.Get("X-Dropped") != "" {
			t.Fatalf("result: %d %q %v", resp.StatusCode, body, resp.Header)
		}
	}
	if ids := p.Submitted(); len(ids) != 1 || ids[0] != acc.Id || p.Status(acc.Id) != "Completed" {
		t.Fatalf("submitted %v", ids)
	}

	// Unknown and missing ids.
	for _, u := range []string{p.StatusURL(), p.ResultURL()} {
		if resp, _ := asyncDo(t, "GET", u, "", map[string]string{"Authorization": "Bearer k", "X-Inference-Id": "nope"}); resp.StatusCode != 404 {
			t.Fatalf("unknown id at %s: %d", u, resp.StatusCode)
		}
		if resp, _ := asyncDo(t, "GET", u, "", auth); resp.StatusCode != 400 {
			t.Fatalf("no id at %s: %d", u, resp.StatusCode)
		}
	}
}
