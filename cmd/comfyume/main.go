// Command comfyume is Caddy with the standard modules and comfyume's, plus a
// "demo" command that runs the embedded default configuration against
// simulated ComfyUI servers and shows one job going end to end.
//
//	go run ./cmd/comfyume demo         # the whole path on one machine
//	go run ./cmd/comfyume run --config Caddyfile
//
// Operators build their own binary with xcaddy (see xcaddy.json); this one
// exists for the demo, tests and development.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/spf13/cobra"

	_ "github.com/comfyume/comfyume/caddymodule"
)

func main() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "demo",
		Usage: "[--listen 127.0.0.1:8080] [--no-job]",
		Short: "Runs the gateway with its embedded defaults in front of simulated ComfyUI servers",
		Long: `Runs the embedded default Caddyfile (the repository's top-level Caddyfile):
the gateway on 127.0.0.1:8080 (this machine only: the demo has no login), a
simulated GPU ComfyUI on 127.0.0.1:8189, and your own ComfyUI on
127.0.0.1:8188 as home if one runs there (else a simulated one, whose page at
/ explains what runs and how to put a real ComfyUI behind it).
It then queues one prompt through the gateway, prints every event the browser
would see, saves the output image, and keeps serving until interrupted.`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().String("listen", defaultListen, "address of the gateway, host:port (\":8080\" is every interface)")
			cmd.Flags().Bool("no-job", false, "do not queue the demonstration prompt")
			cmd.Flags().Duration("step", 0, "simulated GPU time per step (default 150ms)")
			cmd.RunE = runDemo
		},
	})
	caddycmd.Main()
}
