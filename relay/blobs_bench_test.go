package relay

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
)

// BenchmarkDiskBlobsPut stores one output in a new job's folder per
// iteration, as the capture of a job's image does: from a stream (here a
// reader with no WriteTo, like an HTTP response body). The job's folder is
// removed between iterations, untimed.
func BenchmarkDiskBlobsPut(b *testing.B) {
	for _, size := range []int{2 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			d, err := NewDiskBlobs(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			data := bytes.Repeat([]byte("0123456789abcdef"), size/16)
			ctx := context.Background()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				job := fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
				r := struct{ io.Reader }{bytes.NewReader(data)}
				if err := d.Put(ctx, job+"/output/bench_00001_.png", r, BlobInfo{ContentType: "image/png"}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := d.RemoveJob(ctx, job); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
