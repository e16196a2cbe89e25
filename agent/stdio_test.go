package agent

import (
	"context"
	"os"
	"testing"
)

func TestStream(t *testing.T) {
	ctx := context.Background()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	s := newStream(r)
	defer s.Close()

	if _, err := w.WriteString("abcdef"); err != nil {
		t.Fatal(err)
	}
	// A read whose caller has given up loses nothing.
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	var got []byte
	if data, _, err := s.Read(cancelled, 4); err == nil {
		got = append(got, data...)
	}
	for len(got) < 6 {
		data, eof, err := s.Read(ctx, 4)
		if err != nil || eof {
			t.Fatalf("Read = %q, %v, %v", data, eof, err)
		}
		if len(data) > 4 {
			t.Fatalf("Read(4) returned %d bytes", len(data))
		}
		got = append(got, data...)
	}
	if string(got) != "abcdef" {
		t.Fatalf("read %q, want abcdef", got)
	}

	w.Close()
	for range 2 {
		if data, eof, err := s.Read(ctx, 4); err != nil || !eof || len(data) != 0 {
			t.Fatalf("Read at end = %q, %v, %v; want eof", data, eof, err)
		}
	}
}

func TestStreamCloseEndsRead(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	s := newStream(r)
	type result struct {
		eof bool
		err error
	}
	done := make(chan result, 1)
	go func() {
		_, eof, err := s.Read(context.Background(), 4)
		done <- result{eof, err}
	}()
	s.Close()
	if res := <-done; res.err != nil || !res.eof {
		t.Fatalf("Read after Close = %+v, want eof", res)
	}
}
