// Command fakecomfy runs the comfytest fake ComfyUI server standalone, for
// demos and manual testing:
//
//	fakecomfy -listen 127.0.0.1:8189 -version 2026 -step 50ms -name gpu
//
// It also takes ComfyUI's own way of naming the address
// (--listen 127.0.0.1 --port 8188), and can misbehave the ways a real
// ComfyUI does, for tests of what runs it: -start-delay (a slow start)
// and -crash-after-steps (dies in the middle of a job). It serves until
// interrupted (Ctrl-C / SIGTERM).
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8188", "address to listen on (host:port, or a host with -port)")
	port := flag.Int("port", 0, "port to listen on (as ComfyUI's --port; replaces a port given in -listen)")
	version := flag.String("version", "2024-12", `ComfyUI generation to imitate: "2024-12" or "2026"`)
	step := flag.Duration("step", 0, "time per executed node and per sampler step (default 5ms; negative: none, steps run back to back)")
	steps := flag.Int("steps", 0, "progress steps of a FakeSampler without a steps input (default 3)")
	name := flag.String("name", "", "device name shown in /system_stats and log lines")
	previewBytes := flag.Int("preview-bytes", 0, "pad sampler preview JPEGs to about this many bytes")
	quiet := flag.Bool("quiet", false, "do not log requests and job events")
	startDelay := flag.Duration("start-delay", 0, "wait this long before listening (a slow start: loading models, custom nodes)")
	crashAfter := flag.Int("crash-after-steps", 0, "die after sending this many sampler progress events (0: never)")
	crashCode := flag.Int("crash-code", 1, "exit code of -crash-after-steps")
	crashSignal := flag.String("crash-signal", "", "with -crash-after-steps, die of this signal instead (KILL, SEGV, ABRT)")
	crashOnce := flag.String("crash-once", "", "with -crash-after-steps, crash only if this file does not exist, and create it")
	waitFor := flag.String("wait-for", "", "do not listen until this file exists (a start that takes as long as a test wants)")
	flag.Parse()

	if *version != "2024-12" && *version != "2024-08" && *version != "2026" {
		fmt.Fprintf(os.Stderr, "fakecomfy: -version must be 2024-12 or 2026, not %q\n", *version)
		os.Exit(2)
	}
	addr := *listen
	if *port > 0 {
		host := addr
		if h, _, err := net.SplitHostPort(addr); err == nil {
			host = h
		}
		addr = net.JoinHostPort(host, strconv.Itoa(*port))
	}
	opts := comfytest.Options{
		Version:      *version,
		StepDelay:    *step,
		Steps:        *steps,
		Name:         *name,
		PreviewBytes: *previewBytes,
	}
	if !*quiet {
		opts.Logf = log.Printf
	}
	if *crashAfter > 0 {
		var sent atomic.Int64
		opts.OnSend = func(f comfytest.SentFrame) {
			if f.Type != "progress" || sent.Add(1) < int64(*crashAfter) {
				return
			}
			if *crashOnce != "" {
				if _, err := os.Stat(*crashOnce); err == nil {
					return
				}
				_ = os.WriteFile(*crashOnce, nil, 0o644)
			}
			fmt.Fprintf(os.Stderr, "fakecomfy: crashing after %d sampler steps\n", *crashAfter)
			crash(*crashSignal, *crashCode)
		}
	}
	if *startDelay > 0 {
		log.Printf("fakecomfy: loading (%v)…", *startDelay)
		time.Sleep(*startDelay)
	}
	if *waitFor != "" {
		log.Printf("fakecomfy: loading (until %s exists)…", *waitFor)
		for {
			if _, err := os.Stat(*waitFor); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	srv := comfytest.New(opts)
	if err := srv.Listen(addr); err != nil {
		log.Fatalf("fakecomfy: %v", err)
	}
	log.Printf("fakecomfy %s serving %s", *version, srv.URL())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	srv.Close()
}

// crash ends the process the way a broken ComfyUI would.
func crash(sig string, code int) {
	s := map[string]syscall.Signal{"KILL": syscall.SIGKILL, "SEGV": syscall.SIGSEGV, "ABRT": syscall.SIGABRT, "TERM": syscall.SIGTERM}[sig]
	if s != 0 {
		signal.Reset()
		if p, err := os.FindProcess(os.Getpid()); err == nil {
			_ = p.Signal(s)
		}
		time.Sleep(time.Minute)
	}
	os.Exit(code)
}
