package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"
)

// The online service's load: open loop. Request i is due at start +
// i/rate whatever became of the ones before it, and its latency runs from
// when it was due, not from when it went out: a service that stalls meets
// the requests that piled up meanwhile, and each of them counts the stall.
// A closed loop (send, wait for the answer, send the next) would stop
// sending during a stall and so count it once (coordinated omission).

// OnlineLatency is what the load generator saw of the requests due inside
// the measured window.
type OnlineLatency struct {
	// Rate is requests per second, due one every 1/Rate.
	Rate     float64 `json:"rate_per_s"`
	Requests int     `json:"requests"`
	OK       int     `json:"ok"`
	// Timeouts got no answer within requestTimeout of when they were
	// due; they count in the percentiles at requestTimeout. Errors failed
	// otherwise (refused, reset, not 200) and are not in the percentiles.
	Timeouts int    `json:"timeouts"`
	Errors   int    `json:"errors"`
	Error    string `json:"first_error,omitempty"`
	// Latency from when each request was due to the end of its answer.
	P50  float64 `json:"p50_ms"`
	P99  float64 `json:"p99_ms"`
	P999 float64 `json:"p999_ms"`
	Max  float64 `json:"max_ms"`
	// SendLag is how late the generator itself sent requests (a share of
	// each latency): it runs on the same CPUs.
	SendLagP99 float64 `json:"send_lag_p99_ms"`
	SendLagMax float64 `json:"send_lag_max_ms"`
}

// requestTimeout bounds every request, from when it was due.
const requestTimeout = time.Second

type outcome struct {
	latency, lag time.Duration
	timeout      bool
	err          error
}

// newOnlineClient is the generator's HTTP client: connections are kept
// and reused, as many as requests are in flight at once.
func newOnlineClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: requestTimeout}).DialContext,
		MaxIdleConnsPerHost: 1024,
		DisableCompression:  true,
	}}
}

// openLoop sends GET url at rate from start until end and sums up the
// requests due from measureFrom on (the ones before warm the connections
// up). It returns once the last request has its answer or timed out.
func openLoop(ctx context.Context, client *http.Client, url string, rate float64, start, measureFrom, end time.Time) OnlineLatency {
	interval := time.Duration(float64(time.Second) / rate)
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		out []outcome
	)
	for i := 0; ; i++ {
		due := start.Add(time.Duration(i) * interval)
		if !due.Before(end) {
			break
		}
		// Late or not, the request goes now: the ones overdue go at once.
		if wait := time.Until(due); wait > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := request(ctx, client, url, due)
			if due.Before(measureFrom) {
				return
			}
			mu.Lock()
			out = append(out, o)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return summarizeOnline(out, rate)
}

func request(ctx context.Context, client *http.Client, url string, due time.Time) outcome {
	ctx, cancel := context.WithDeadline(ctx, due.Add(requestTimeout))
	defer cancel()
	o := outcome{lag: time.Since(due)}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		o.err = err
		return o
	}
	resp, err := client.Do(req)
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s", resp.Status)
		}
	}
	o.latency = time.Since(due)
	switch {
	case err == nil:
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		o.timeout, o.latency = true, requestTimeout
	default:
		o.err = err
	}
	return o
}

func summarizeOnline(out []outcome, rate float64) OnlineLatency {
	l := OnlineLatency{Rate: rate, Requests: len(out)}
	var lat, lag []float64
	for _, o := range out {
		lag = append(lag, ms(o.lag))
		switch {
		case o.timeout:
			l.Timeouts++
		case o.err != nil:
			l.Errors++
			if l.Error == "" {
				l.Error = o.err.Error()
			}
			continue
		default:
			l.OK++
		}
		lat = append(lat, ms(o.latency))
	}
	sort.Float64s(lat)
	sort.Float64s(lag)
	if len(lat) > 0 {
		l.P50, l.P99, l.P999, l.Max = percentile(lat, 50), percentile(lat, 99), percentile(lat, 99.9), lat[len(lat)-1]
	}
	if len(lag) > 0 {
		l.SendLagP99, l.SendLagMax = percentile(lag, 99), lag[len(lag)-1]
	}
	return l
}
