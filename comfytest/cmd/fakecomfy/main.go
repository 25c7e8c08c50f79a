// Command fakecomfy runs the comfytest fake ComfyUI server standalone, for
// demos and manual testing:
//
//	fakecomfy -listen 127.0.0.1:8189 -version 2026 -step 50ms -name gpu
//
// It serves until interrupted (Ctrl-C / SIGTERM).
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/comfyume/comfyume/comfytest"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8188", "address to listen on (host:port)")
	version := flag.String("version", "2024-12", `ComfyUI generation to imitate: "2024-12" or "2026"`)
	step := flag.Duration("step", 0, "time per executed node and per sampler step (default 5ms; negative: none, steps run back to back)")
	steps := flag.Int("steps", 0, "progress steps of a FakeSampler without a steps input (default 3)")
	name := flag.String("name", "", "device name shown in /system_stats and log lines")
	previewBytes := flag.Int("preview-bytes", 0, "pad sampler preview JPEGs to about this many bytes")
	quiet := flag.Bool("quiet", false, "do not log requests and job events")
	flag.Parse()

	if *version != "2024-12" && *version != "2024-08" && *version != "2026" {
		fmt.Fprintf(os.Stderr, "fakecomfy: -version must be 2024-12 or 2026, not %q\n", *version)
		os.Exit(2)
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
	srv := comfytest.New(opts)
	if err := srv.Listen(*listen); err != nil {
		log.Fatalf("fakecomfy: %v", err)
	}
	log.Printf("fakecomfy %s serving %s", *version, srv.URL())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	srv.Close()
}
