package comfytest

import (
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// With SerialSend, as in ComfyUI, one socket whose peer does not read holds
// up every other socket once its buffers are full, until it closes; by
// default each socket has its own writer and the others go on.
func TestSerialSendSlowSocketHoldsUpOthers(t *testing.T) {
	for _, serial := range []bool{false, true} {
		var slowBytes atomic.Int64
		srv := Start(t, Options{Version: "2026", SerialSend: serial, PreviewBytes: 256 << 10, StepDelay: 2 * time.Millisecond,
			OnSend: func(f SentFrame) {
				if f.SID == "slow" {
					slowBytes.Add(int64(f.Bytes))
				}
			}})
		d := websocket.Dialer{NetDial: func(network, addr string) (net.Conn, error) {
			c, err := net.Dial(network, addr)
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetReadBuffer(64 << 10)
			}
			return c, err
		}}
		slow, _, err := d.Dial(wsURL(srv.URL())+"?clientId=slow", nil)
		if err != nil {
			t.Fatal(err)
		}
		fast := dialWS(t, srv.URL(), "fast")
		fast.next() // status
		frames := make(chan []byte, 1024)
		go func(c *websocket.Conn) {
			for {
				_, b, err := c.ReadMessage()
				if err != nil {
					close(frames)
					return
				}
				frames <- b
			}
		}(fast.c)
		wf := samplerWorkflow("s")
		wf["2"].(map[string]any)["inputs"].(map[string]any)["steps"] = 200
		spid := queuePrompt(t, srv.URL(), map[string]any{"prompt": wf, "client_id": "slow"})
		// Until its job ended (execution never waits for a socket) and
		// the slow socket takes no more (its writes wait).
		last, since := int64(-1), time.Now()
		for time.Since(since) < 300*time.Millisecond {
			if n := slowBytes.Load(); n != last {
				last, since = n, time.Now()
			}
			time.Sleep(10 * time.Millisecond)
		}
		for {
			_, h := doReq(t, "GET", srv.URL()+"/history/"+spid, nil, nil)
			if len(h) > 2 {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		for len(frames) > 0 { // what it was sent before
			<-frames
		}
		pid := queuePrompt(t, srv.URL(), map[string]any{"prompt": samplerWorkflow("f"), "client_id": "fast"})
		got := false
		for timeout := time.After(500 * time.Millisecond); !got; {
			select {
			case b := <-frames:
				got = strings.Contains(string(b), pid)
			case <-timeout:
				got = false
				goto checked
			}
		}
	checked:
		if serial && got {
			t.Fatal("SerialSend: a socket got its job's events while another socket's writes waited")
		}
		if !serial && !got {
			t.Fatal("a socket that does not read held up another")
		}
		slow.Close() // its writes fail: the loop goes on
		for got = false; !got; {
			b, ok := <-frames
			if !ok {
				t.Fatal("socket closed")
			}
			got = strings.Contains(string(b), `"node": null`) || strings.Contains(string(b), `"node":null`)
			got = got && strings.Contains(string(b), pid)
		}
	}
}
