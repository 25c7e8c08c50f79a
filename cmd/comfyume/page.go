package main

import (
	"bytes"
	"html/template"
	"net"
)

// demoPageTemplate is what the simulated home serves at "/", so a newcomer
// who opens the demo in a browser learns what runs and how to put a real
// ComfyUI behind it. Plain HTML: no script, nothing loaded from elsewhere.
var demoPageTemplate = template.Must(template.New("demo").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>comfyume demo</title>
<style>
body { font-family: sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; line-height: 1.5; }
code, pre { background: #f2f2f2; }
pre { padding: .5em; overflow-x: auto; }
</style>
</head>
<body>
<h1>comfyume demo: the gateway is running</h1>
<p>You are looking at this page through <b>comfyume</b>, a Caddy server at
{{.Base}}.{{if .Loopback}} It only answers this machine ({{.Listen}}): the demo has no login.{{end}}
Behind it, <code>comfyume demo</code> started two <em>simulated</em> ComfyUI servers:</p>
<ul>
<li><b>home</b> at {{.Home}} stands in for your own ComfyUI. The gateway passes the
web UI, user data and models to it. This simulated one answers ComfyUI's API but has no
web UI, so this page is all there is to see here.</li>
<li><b>pool "gpu"</b> at {{.GPU}} stands in for a remote GPU server. Every prompt
queued through the gateway runs there; its progress, previews and results reach the
browser's WebSocket as if the job ran on home, and its outputs are captured and served
on <code>/view</code>.</li>
</ul>
<p>The terminal that runs the demo shows one job going end to end. The API answers here
too: <code>/api/jobs</code>, <code>/queue</code>, <code>/history</code>,
<code>/system_stats</code>.</p>
<h2>Put a real ComfyUI behind it</h2>
<ol>
<li>Stop the demo (Ctrl-C in its terminal).</li>
<li>In your ComfyUI folder, start ComfyUI on the home address:
<pre>python main.py --listen 127.0.0.1 --port {{.HomePort}}</pre></li>
<li>Run <code>go run ./cmd/comfyume demo</code> again. It finds your ComfyUI and makes it
the home, so {{.Base}} shows ComfyUI's own UI, with prompts running on the pool. The
simulated GPU only knows test nodes (EmptyImage, LoadImage, ImageInvert, ImageBlur,
FakeSampler, SaveImage, PreviewImage, SaveImageWebsocket).</li>
<li>For real GPU work, start a ComfyUI where the GPU is, set the pool's
<code>upstream</code> in the <code>Caddyfile</code> to its address, and run
<code>go run ./cmd/comfyume run --config Caddyfile</code>. Before other people use it,
add a login and serve a domain with HTTPS: the README's <em>Configure</em> and
<em>Deploy</em> sections.</li>
</ol>
</body>
</html>
`))

func demoPage(c demoConfig, base string) string {
	_, homePort, _ := net.SplitHostPort(c.HomeAddr)
	var b bytes.Buffer
	host, _, _ := net.SplitHostPort(c.Listen)
	ip := net.ParseIP(host)
	_ = demoPageTemplate.Execute(&b, map[string]any{
		"Base": base, "Listen": c.Listen, "Home": c.HomeAddr, "GPU": c.GPUAddr, "HomePort": homePort,
		"Loopback": host == "localhost" || (ip != nil && ip.IsLoopback()),
	})
	return b.String()
}
