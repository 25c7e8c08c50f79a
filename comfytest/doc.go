// Package comfytest is a faithful fake ComfyUI server for tests, demos and
// benchmarks. It needs no GPU and no Python: it executes a handful of real
// image nodes (EmptyImage, LoadImage, ImageInvert, ImageBlur, SaveImage,
// PreviewImage, SaveImageWebsocket and a FakeSampler that emits progress and
// live previews) with Go's image packages, and speaks ComfyUI's HTTP and
// WebSocket protocol the way the recordings in shared/wire-traces show:
// same routes (under both /x and /api/x), same message order and field
// order, same error bodies, same /view and /upload rules.
//
// Two server generations are modelled, selected by Options.Version:
//
//   - "2024-12" (default): ComfyUI of December 2024. The server makes its own
//     prompt ids, ignores the client's feature_flags, sends only type-1
//     previews, has no /features, no /api/jobs and no progress_state.
//   - "2026": a current ComfyUI. Honours a client prompt_id, answers
//     feature_flags, sends type-4 previews (with node/prompt metadata) to
//     sockets that declared supports_preview_metadata, emits progress_state,
//     serves /features, /api/jobs and /api/jobs/{id}, keeps comfy.org
//     credentials out of /queue, /history and /api/jobs, rejects
//     Sec-Fetch-Site: cross-site.
//
// Typical use in a test:
//
//	srv := comfytest.Start(t, comfytest.Options{Version: "2026"})
//	// point the code under test at srv.URL() ...
//	srv.PutInput("", "cat.png", pngBytes)
//	srv.FailNext("error")          // the next job ends with execution_error
//	_ = srv.Prompts()               // what arrived at POST /prompt
//	b, ok := srv.OutputFile("output", "", "ComfyUI_00001_.png")
//
// For event benchmarks, Options.StepDelay < 0 runs steps with no delay,
// FixedRate paces sampler steps on a clock, PreviewEvery thins out previews,
// PreviewBytes pads them, and OnSend reports when each frame was queued and
// written (bench/events_test.go uses all of them).
//
// Everything is kept in memory (input/output/temp files, user data, queue,
// history) and the server is safe for concurrent use. The package imports
// nothing from the rest of the module on purpose: it is an independent
// reference implementation of the protocol, so a misunderstanding in the
// gateway's protocol code cannot be mirrored here and cancel out.
//
// Known simplifications: ComfyUI executes output nodes in Python-set order
// (random per process); the fake orders them by the number of upstream nodes
// and then by id, which reproduces the recorded traces. /view?preview=webp
// is answered with a JPEG (Content-Type image/jpeg) because Go has no WebP
// encoder. ImageBlur is a box blur, not a Gaussian one. Only the node types
// listed above exist; any other class_type is rejected as unknown.
package comfytest
