package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/gorilla/websocket"
	"github.com/spf13/cobra"

	"github.com/comfyume/comfyume"
	"github.com/comfyume/comfyume/comfytest"
)

// demoConfig is where the demo's parts listen. All of them are loopback
// addresses by default: the gateway has no login.
type demoConfig struct {
	Listen   string // the gateway's site, host:port (default 127.0.0.1:8080)
	HomeAddr string // home ComfyUI (yours if one answers there, else simulated)
	GPUAddr  string // the simulated GPU of pool "gpu"
	Admin    string // Caddy's admin endpoint ("off" to disable)
	Step     time.Duration
}

const defaultListen = "127.0.0.1:8080"

func defaultDemoConfig() demoConfig {
	return demoConfig{Listen: defaultListen, HomeAddr: "127.0.0.1:8188", GPUAddr: "127.0.0.1:8189", Admin: "localhost:2019", Step: 150 * time.Millisecond}
}

// demoCaddyfile is the embedded Caddyfile with the demo's addresses: the
// site's port and bind host from c.Listen (an empty host, e.g. ":8080",
// drops the bind line: every interface), and home, GPU and admin as given.
func demoCaddyfile(c demoConfig) ([]byte, error) {
	host, port, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", c.Listen, err)
	}
	cf := string(comfyume.DefaultCaddyfile)
	bind := "" // every interface
	if host != "" {
		bind = "\tbind " + host + "\n"
	}
	for _, r := range [][2]string{
		{"\n:8080 {", "\n:" + port + " {"},
		{"\tbind 127.0.0.1\n", bind},
		{"admin localhost:2019", "admin " + c.Admin},
		{"127.0.0.1:8188", c.HomeAddr},
		{"127.0.0.1:8189", c.GPUAddr},
	} {
		if !strings.Contains(cf, r[0]) {
			return nil, fmt.Errorf("embedded Caddyfile: %q not found", r[0])
		}
		cf = strings.ReplaceAll(cf, r[0], r[1])
	}
	return []byte(cf), nil
}

// demo is a running demonstration: the gateway and its simulated servers.
type demo struct {
	Base      string // the gateway's URL
	Simulated bool   // home is simulated (no ComfyUI answered at HomeAddr)
	stops     []func()
}

func (d *demo) Stop() {
	for i := len(d.stops) - 1; i >= 0; i-- {
		d.stops[i]()
	}
}

// startDemo starts the simulated servers and the gateway, saying what it
// does on out, and returns once the gateway serves.
func startDemo(c demoConfig, out io.Writer) (*demo, error) {
	d := &demo{}
	started := false
	defer func() {
		if !started {
			d.Stop()
		}
	}()
	host, port, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", c.Listen, err)
	}
	switch host {
	case "", "127.0.0.1", "localhost":
		d.Base = "http://localhost:" + port
	default:
		d.Base = "http://" + net.JoinHostPort(host, port)
	}
	fmt.Fprintf(out, "[1/4] home: looking for your ComfyUI on %s\n", c.HomeAddr)
	if comfyUIAt(c.HomeAddr) {
		fmt.Fprintf(out, "      found one: it is the home, its web UI is what %s shows\n", d.Base)
	} else {
		d.Simulated = true
		home := comfytest.New(comfytest.Options{Version: "2026", Name: "home (simulated)", StepDelay: c.Step, IndexHTML: demoPage(c, d.Base)})
		if err := home.Listen(c.HomeAddr); err != nil {
			return nil, fmt.Errorf("starting simulated home on %s: %w", c.HomeAddr, err)
		}
		d.stops = append(d.stops, home.Close)
		fmt.Fprintf(out, "      none there: started a simulated one (API only, no web UI)\n")
	}
	fmt.Fprintf(out, "[2/4] pool \"gpu\": starting a simulated GPU ComfyUI on %s\n", c.GPUAddr)
	gpu := comfytest.New(comfytest.Options{Version: "2026", Name: "gpu (simulated)", StepDelay: c.Step})
	if err := gpu.Listen(c.GPUAddr); err != nil {
		return nil, fmt.Errorf("starting simulated GPU on %s: %w", c.GPUAddr, err)
	}
	d.stops = append(d.stops, gpu.Close)

	fmt.Fprintf(out, "[3/4] gateway: Caddy with the embedded Caddyfile on %s (Caddy's log follows on stderr)\n", c.Listen)
	if host == "" || host == "0.0.0.0" || host == "::" {
		fmt.Fprintf(out, "      warning: %s is every interface, and the demo has no login: anyone who reaches this machine can use it\n", c.Listen)
	}
	cf, err := demoCaddyfile(c)
	if err != nil {
		return nil, err
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(cf, map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, fmt.Errorf("embedded Caddyfile: %w", err)
	}
	for _, w := range warnings {
		fmt.Fprintln(out, "caddyfile:", w.String())
	}
	if err := caddy.Load(cfg, true); err != nil {
		return nil, err
	}
	d.stops = append(d.stops, func() { _ = caddy.Stop() })
	started = true
	return d, nil
}

func runDemo(cmd *cobra.Command, _ []string) error {
	c := defaultDemoConfig()
	c.Listen, _ = cmd.Flags().GetString("listen")
	noJob, _ := cmd.Flags().GetBool("no-job")
	if step, _ := cmd.Flags().GetDuration("step"); step != 0 {
		c.Step = step
	}
	d, err := startDemo(c, os.Stdout)
	if err != nil {
		return err
	}
	defer d.Stop()
	homeKind := "your ComfyUI"
	if d.Simulated {
		homeKind = "a simulated home ComfyUI"
	}
	fmt.Printf("\ncomfyume is running on %s\n  home: %s at %s\n  pool \"gpu\": a simulated GPU ComfyUI at %s\n\n", d.Base, homeKind, c.HomeAddr, c.GPUAddr)
	if noJob {
		fmt.Println("[4/4] --no-job: no demonstration prompt")
	} else {
		fmt.Println("[4/4] one prompt through the gateway, as the ComfyUI frontend sends it; every event its browser would see:")
		if err := demoJob(d.Base); err != nil {
			fmt.Println("demo job failed:", err)
		}
	}
	if d.Simulated {
		fmt.Printf("\nOpen %s in a browser: a page explains what runs here and how to put your ComfyUI behind it. Ctrl-C stops.\n", d.Base)
	} else {
		fmt.Printf("\nOpen %s in a browser: your ComfyUI's UI, with prompts running on the pool. Ctrl-C stops.\n", d.Base)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt)
	<-sig
	return nil
}

func comfyUIAt(addr string) bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + addr + "/system_stats")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

// demoJob does what the ComfyUI frontend does for one Queue Prompt click and
// prints what it sees.
func demoJob(base string) error {
	wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws"
	conn, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`))
	var sid string
	for sid == "" {
		_, b, err := conn.ReadMessage()
		if err != nil {
			return err
		}
		var m struct {
			Type string `json:"type"`
			Data struct {
				SID string `json:"sid"`
			} `json:"data"`
		}
		_ = json.Unmarshal(b, &m)
		sid = m.Data.SID
	}
	fmt.Println("browser socket open, sid", sid)
	prompt := map[string]any{
		"client_id": sid,
		"prompt": map[string]any{
			"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 256, "height": 256, "batch_size": 1, "color": 0x3366cc}},
			"2": map[string]any{"class_type": "FakeSampler", "inputs": map[string]any{"image": []any{"1", 0}, "steps": 4}},
			"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": "comfyume_demo"}},
		},
	}
	body, _ := json.Marshal(prompt)
	resp, err := http.Post(base+"/api/prompt", "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	rb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Printf("POST /api/prompt → %d %s\n", resp.StatusCode, rb)
	if resp.StatusCode != 200 {
		return fmt.Errorf("prompt refused")
	}
	var ref map[string]any
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		_ = conn.SetReadDeadline(deadline)
		typ, b, err := conn.ReadMessage()
		if err != nil {
			return err
		}
		if typ == websocket.BinaryMessage {
			fmt.Printf("  ws binary preview, %d bytes (type %d)\n", len(b), b[3])
			continue
		}
		fmt.Printf("  ws %s\n", b)
		var m struct {
			Type string `json:"type"`
			Data struct {
				Node   any `json:"node"`
				Output struct {
					Images []map[string]any `json:"images"`
				} `json:"output"`
			} `json:"data"`
		}
		_ = json.Unmarshal(b, &m)
		if m.Type == "executed" && len(m.Data.Output.Images) > 0 {
			ref = m.Data.Output.Images[0]
		}
		if m.Type == "executing" && m.Data.Node == nil {
			break
		}
	}
	if ref == nil {
		return fmt.Errorf("no output arrived")
	}
	q := fmt.Sprintf("filename=%v&subfolder=%v&type=%v", ref["filename"], ref["subfolder"], ref["type"])
	viewURL := base + "/api/view?" + q
	resp, err = http.Get(viewURL)
	if err != nil {
		return err
	}
	img, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	out := filepath.Join(os.TempDir(), "comfyume-demo.png")
	if err := os.WriteFile(out, img, 0o644); err != nil {
		return err
	}
	fmt.Printf("output: %s (%d bytes, %s) saved to %s\n", viewURL, len(img), resp.Header.Get("Content-Type"), out)
	return nil
}
