package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
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

const (
	homeAddr = "127.0.0.1:8188"
	gpuAddr  = "127.0.0.1:8189"
)

func runDemo(cmd *cobra.Command, _ []string) error {
	listen, _ := cmd.Flags().GetString("listen")
	noJob, _ := cmd.Flags().GetBool("no-job")
	step, _ := cmd.Flags().GetDuration("step")
	if step == 0 {
		step = 150 * time.Millisecond
	}

	homeKind := "your ComfyUI"
	if !comfyUIAt(homeAddr) {
		home := comfytest.New(comfytest.Options{Version: "2026", Name: "home (simulated)", StepDelay: step})
		if err := home.Listen(homeAddr); err != nil {
			return fmt.Errorf("starting simulated home on %s: %w", homeAddr, err)
		}
		defer home.Close()
		homeKind = "a simulated home ComfyUI"
	}
	gpu := comfytest.New(comfytest.Options{Version: "2026", Name: "gpu (simulated)", StepDelay: step})
	if err := gpu.Listen(gpuAddr); err != nil {
		return fmt.Errorf("starting simulated GPU on %s: %w", gpuAddr, err)
	}
	defer gpu.Close()

	cf := bytes.Replace(comfyume.DefaultCaddyfile, []byte("\n:8080 {"), []byte("\n"+listen+" {"), 1)
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(cf, map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return fmt.Errorf("embedded Caddyfile: %w", err)
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "caddyfile:", w.String())
	}
	if err := caddy.Load(cfg, true); err != nil {
		return err
	}
	defer caddy.Stop() //nolint:errcheck

	base := "http://" + strings.Replace(listen, ":", "localhost:", 1)
	if !strings.HasPrefix(listen, ":") {
		base = "http://" + listen
	}
	fmt.Printf("\ncomfyume is running on %s\n  home: %s at %s\n  pool \"gpu\": a simulated GPU ComfyUI at %s\n\n", base, homeKind, homeAddr, gpuAddr)
	if !noJob {
		if err := demoJob(base); err != nil {
			fmt.Println("demo job failed:", err)
		}
	}
	if homeKind == "your ComfyUI" {
		fmt.Printf("\nOpen %s in a browser: your ComfyUI's UI, with prompts running on the pool. Ctrl-C stops.\n", base)
	} else {
		fmt.Printf("\nThe simulated home serves the API but no web UI: start ComfyUI on %s and run this again to use the UI through %s. Ctrl-C stops.\n", homeAddr, base)
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
