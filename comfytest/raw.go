package comfytest

// SendRaw queues a frame, as is, on every connected WebSocket, after the
// frames already queued there: what a buggy or hostile server might send
// in the middle of a job (an oversized event or preview, say).
func (s *Server) SendRaw(binary bool, frame []byte) {
	s.send(broadcast, wsMsg{binary: binary, data: frame})
}
