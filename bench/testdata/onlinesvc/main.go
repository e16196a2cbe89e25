// Command onlinesvc is the online service of `make bench-colo`: an HTTP
// server whose every request does a fixed amount of CPU work, run in a
// runc container on the host's network.
//
//	onlinesvc serve ADDR ITERATIONS   serve GET / on ADDR, ITERATIONS of work per request
//	onlinesvc calibrate               print how many iterations take a millisecond here, as JSON
//
// The work is a fixed number of iterations, not a fixed time: a request
// that loses its CPU to other work takes longer, as a real one does.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "onlinesvc:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	switch {
	case len(args) == 3 && args[0] == "serve":
		n, err := strconv.ParseUint(args[2], 10, 64)
		if err != nil || n == 0 {
			return fmt.Errorf("serve: want a positive number of iterations, got %q", args[2])
		}
		return serve(args[1], n)
	case len(args) == 1 && args[0] == "calibrate":
		perMs, sum := calibrate()
		return json.NewEncoder(os.Stdout).Encode(map[string]uint64{"iterations_per_ms": perMs, "sum": sum})
	}
	return errors.New("usage: onlinesvc serve ADDR ITERATIONS | onlinesvc calibrate")
}

// work is ITERATIONS rounds of a 64-bit LCG and xorshift: nothing the
// compiler can fold, no memory traffic, and the result is returned so it
// is not dropped.
func work(n uint64) uint64 {
	x := n | 1
	for range n {
		x = x*6364136223846793005 + 1442695040888963407
		x ^= x >> 33
	}
	return x
}

// calibrate times a batch of work again and again and keeps the fastest
// try: the one least disturbed by anything else on the machine. The
// results are summed and returned, as the server's are sent: work whose
// result is dropped may be compiled away.
func calibrate() (perMs, sum uint64) {
	const batch = 1 << 20
	best := time.Duration(1<<63 - 1)
	for range 30 {
		start := time.Now()
		sum += work(batch)
		best = min(best, time.Since(start))
	}
	return uint64(float64(batch) / (float64(best) / float64(time.Millisecond))), sum
}

func serve(addr string, n uint64) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%x\n", work(n))
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
