// Package worker is the "pinned transport" for GPU pools behind a
// non-sticky load balancer (serverless containers such as Verda's): a
// load balancer there sends every HTTP request to any replica, so
// ComfyUI's conversation of /upload/image, POST /prompt, WebSocket events,
// /history and /view cannot be spread over several requests.
//
// Inside each GPU container a small worker (Server) runs in front of the
// local ComfyUI. The gateway (Client) sends one streaming HTTP request per
// job: its body carries the prompt and the input files, and the response
// streams back every event, preview and output file of that job. One
// request reaches one replica; nothing depends on stickiness.
//
// Both bodies are streams of frames, [1 byte kind][u32 big-endian length]
// [payload]; Kind documents every kind. A request body is
//
//	job, (file chunk* file end)*, start
//
// and the response (200, Content-Type application/x-comfyume-job) is
//
//	accepted, (event | binary | output begin, output chunk*, output end | heartbeat)*, done|error
//	rejected, done
//
// The worker does:
//
//  1. read the job frame; open a WebSocket to the local ComfyUI with a
//     client id of its own and wait for its greeting (status), then send
//     feature_flags (supports_preview_metadata) to get type-4 previews;
//  2. stream every file to the local POST /upload/image (overwrite=true,
//     names kept) as its chunks arrive;
//  3. POST /prompt with the gateway's prompt_id and its client id. Until
//     here nothing was written: a failure is an HTTP error (503 when the
//     local ComfyUI cannot be reached, so that the gateway may retry
//     elsewhere). A 4xx/500 from ComfyUI becomes a rejected frame with
//     its body verbatim;
//  4. relay the prompt's WebSocket messages (filtered by prompt_id, or by
//     "our prompt is running" for frames without one), with the prompt id
//     mapped back to the gateway's when an older ComfyUI made its own
//     (inside type-4 preview metadata too); before an executed event, it
//     fetches every file the event names from the local /view and streams
//     it as output frames;
//  5. end with done after the terminal event and executing{node:null}.
//
// If the request ends early (the gateway left or cancelled), the worker
// interrupts the local prompt (or removes it from the queue). Heartbeat
// frames keep idle proxies from closing the stream; a watchdog fails a job
// whose ComfyUI went silent. GET on the handler answers a small status
// ({"ready","running"}, 503 until the local ComfyUI answers), usable as
// the platform's health check.
//
// With Options.Supervisor the worker also runs the local ComfyUI as its
// child (Supervisor: readiness by polling, output to the log, restart
// with backoff, stop with the worker): it is ready only while that
// ComfyUI is, and a job whose ComfyUI ends ends with an error frame saying
// how (exit code, signal, out of memory) and the lines it printed
// meanwhile.
//
// On platforms that only offer asynchronous request/response HTTP
// (Verda's "Prefer: respond-async"), set Client.Async: the same request
// is submitted, the platform stores the worker's whole response (the
// frame stream) and the client reads it back from the result endpoint
// once the job ended; see AsyncOptions. The worker is unchanged.
package worker
