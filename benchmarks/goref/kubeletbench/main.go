// Command kubeletbench is the kubelet side of benchmarks/compare.py: it talks to DRA kubelet
// plugins over their unix sockets with the kubelet's own generated clients (k8s.io/kubelet)
// and times the calls, and it measures the floor of a prepare (one API read of the claim plus
// the file writes, nothing else) in the same run.
//
// It reads one JSON command per line on stdin and answers each with one JSON line on stdout:
//
//	{"op":"wait_getinfo","socket":S,"timeout_s":30}   poll S until GetInfo answers
//	{"op":"register","agent":A,"socket":S}            GetInfo, NotifyRegistrationStatus, dial
//	{"op":"prepare","agent":A,"mode":M,"claims":[...]} M: sequential | parallel | batch
//	{"op":"unprepare","agent":A,"mode":M,"claims":[...]}
//	{"op":"close","agent":A}
//	{"op":"floor_setup","kubeconfig":K,"dir":D,"qps":Q,"burst":B}
//	{"op":"floor_prepare","mode":M,"claims":[...]} / {"op":"floor_unprepare",...}
//
// A claim is {"namespace","name","uid"}. Sequential makes one call per claim in order;
// parallel one call per claim, all released together; batch one call for all. Every answer
// carries the per-call latencies in ms, the time to the last reply, the errors, and the
// process's own CPU time during the command (the floor's CPU).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drav1 "k8s.io/kubelet/pkg/apis/dra/v1"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type claim struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
}

type command struct {
	Op         string  `json:"op"`
	Agent      string  `json:"agent"`
	Socket     string  `json:"socket"`
	Mode       string  `json:"mode"`
	Claims     []claim `json:"claims"`
	TimeoutS   float64 `json:"timeout_s"`
	Kubeconfig string  `json:"kubeconfig"`
	Dir        string  `json:"dir"`
	QPS        float64 `json:"qps"`
	Burst      int     `json:"burst"`
}

type answer struct {
	OK       bool      `json:"ok"`
	Error    string    `json:"error,omitempty"`
	Calls    []float64 `json:"calls_ms,omitempty"`
	TotalMS  float64   `json:"total_ms"`
	Errors   []string  `json:"errors,omitempty"`
	CPUMS    float64   `json:"cpu_ms"`
	Answered int64     `json:"answered_unix_ns,omitempty"`
	Attempts int       `json:"attempts,omitempty"`
	Version  string    `json:"version,omitempty"`
	Endpoint string    `json:"endpoint,omitempty"`
	Bytes    int       `json:"checkpoint_bytes,omitempty"`
}

// agent is one registered plugin: its DRA connection and the v1 client on it.
type agent struct {
	conn   *grpc.ClientConn
	client drav1.DRAPluginClient
}

type bench struct {
	agents map[string]*agent
	floor  *floor
}

func main() {
	b := &bench{agents: map[string]*agent{}}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var cmd command
		var ans answer
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			ans = answer{Error: "bad command: " + err.Error()}
		} else {
			before := cpuTime()
			ans = b.do(cmd)
			ans.CPUMS = float64(cpuTime()-before) / 1e6
		}
		if err := out.Encode(ans); err != nil {
			fmt.Fprintln(os.Stderr, "kubeletbench:", err)
			os.Exit(2)
		}
	}
	for _, a := range b.agents {
		_ = a.conn.Close()
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func fail(err error) answer { return answer{Error: err.Error()} }

func (b *bench) do(cmd command) answer {
	switch cmd.Op {
	case "wait_getinfo":
		return waitGetInfo(cmd.Socket, cmd.TimeoutS)
	case "register":
		return b.register(cmd.Agent, cmd.Socket)
	case "close":
		if a, ok := b.agents[cmd.Agent]; ok {
			_ = a.conn.Close()
			delete(b.agents, cmd.Agent)
		}
		return answer{OK: true}
	case "prepare", "unprepare":
		a, ok := b.agents[cmd.Agent]
		if !ok {
			return fail(fmt.Errorf("agent %q is not registered", cmd.Agent))
		}
		call := a.prepare
		if cmd.Op == "unprepare" {
			call = a.unprepare
		}
		return timeCalls(cmd.Mode, cmd.Claims, call)
	case "floor_setup":
		f, err := newFloor(cmd.Kubeconfig, cmd.Dir, cmd.QPS, cmd.Burst)
		if err != nil {
			return fail(err)
		}
		b.floor = f
		return answer{OK: true}
	case "floor_prepare", "floor_unprepare":
		if b.floor == nil {
			return fail(errors.New("floor_setup first"))
		}
		call := b.floor.prepare
		if cmd.Op == "floor_unprepare" {
			call = b.floor.unprepare
		}
		ans := timeCalls(cmd.Mode, cmd.Claims, call)
		ans.Bytes = b.floor.size()
		return ans
	}
	return fail(fmt.Errorf("unknown op %q", cmd.Op))
}

func dial(path string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix:"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

func getInfo(socket string, timeout time.Duration) (*registration.PluginInfo, error) {
	conn, err := dial(socket)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return registration.NewRegistrationClient(conn).GetInfo(ctx, &registration.InfoRequest{})
}

// waitGetInfo polls the registration socket every 2 ms until GetInfo answers, as the
// kubelet's plugin watcher would find it; it reports the wall-clock time of the answer.
func waitGetInfo(socket string, timeoutS float64) answer {
	if timeoutS <= 0 {
		timeoutS = 30
	}
	deadline := time.Now().Add(time.Duration(timeoutS * float64(time.Second)))
	attempts := 0
	var last error
	for time.Now().Before(deadline) {
		if _, err := os.Stat(socket); err == nil {
			attempts++
			info, err := getInfo(socket, time.Second)
			if err == nil && info.Type == registration.DRAPlugin {
				return answer{OK: true, Answered: time.Now().UnixNano(), Attempts: attempts}
			}
			last = err
		}
		time.Sleep(2 * time.Millisecond)
	}
	return answer{Error: fmt.Sprintf("GetInfo on %s did not answer within %g s (%d attempts, last error %v)", socket, timeoutS, attempts, last), Attempts: attempts}
}

// register does what the kubelet's plugin watcher does with a new DRA plugin.
func (b *bench) register(name, socket string) answer {
	info, err := getInfo(socket, time.Second)
	if err != nil {
		return fail(fmt.Errorf("GetInfo: %w", err))
	}
	if info.Type != registration.DRAPlugin {
		return fail(fmt.Errorf("GetInfo: type %q", info.Type))
	}
	found := false
	for _, v := range info.SupportedVersions {
		found = found || v == drav1.DRAPluginService
	}
	if !found {
		return fail(fmt.Errorf("the plugin does not offer %s: %v", drav1.DRAPluginService, info.SupportedVersions))
	}
	conn, err := dial(socket)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_, err = registration.NewRegistrationClient(conn).NotifyRegistrationStatus(ctx, &registration.RegistrationStatus{PluginRegistered: true})
	cancel()
	_ = conn.Close()
	if err != nil {
		return fail(fmt.Errorf("NotifyRegistrationStatus: %w", err))
	}
	endpoint := info.Endpoint
	if endpoint == "" {
		endpoint = socket
	}
	dra, err := dial(endpoint)
	if err != nil {
		return fail(err)
	}
	if old, ok := b.agents[name]; ok {
		_ = old.conn.Close()
	}
	b.agents[name] = &agent{conn: dra, client: drav1.NewDRAPluginClient(dra)}
	return answer{OK: true, Version: drav1.DRAPluginService, Endpoint: endpoint}
}

func request(claims []claim) []*drav1.Claim {
	out := make([]*drav1.Claim, 0, len(claims))
	for _, c := range claims {
		out = append(out, &drav1.Claim{Namespace: c.Namespace, Name: c.Name, Uid: c.UID})
	}
	return out
}

// perClaim checks a response as the kubelet does: every claim answered, no error.
func perClaim[T interface{ GetError() string }](claims []claim, got map[string]T) []string {
	var errs []string
	for _, c := range claims {
		r, ok := got[c.UID]
		if !ok {
			errs = append(errs, c.Name+": no answer for the claim")
		} else if e := r.GetError(); e != "" {
			errs = append(errs, c.Name+": "+e)
		}
	}
	return errs
}

func (a *agent) prepare(claims []claim) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	resp, err := a.client.NodePrepareResources(ctx, &drav1.NodePrepareResourcesRequest{Claims: request(claims)})
	if err != nil {
		return []string{"NodePrepareResources: " + err.Error()}
	}
	return perClaim(claims, resp.Claims)
}

func (a *agent) unprepare(claims []claim) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	resp, err := a.client.NodeUnprepareResources(ctx, &drav1.NodeUnprepareResourcesRequest{Claims: request(claims)})
	if err != nil {
		return []string{"NodeUnprepareResources: " + err.Error()}
	}
	return perClaim(claims, resp.Claims)
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// timeCalls runs call over the claims in the given mode and times each call.
func timeCalls(mode string, claims []claim, call func([]claim) []string) answer {
	ans := answer{OK: true}
	switch mode {
	case "sequential", "":
		started := time.Now()
		for _, c := range claims {
			t := time.Now()
			ans.Errors = append(ans.Errors, call([]claim{c})...)
			ans.Calls = append(ans.Calls, ms(time.Since(t)))
		}
		ans.TotalMS = ms(time.Since(started))
	case "batch":
		started := time.Now()
		ans.Errors = call(claims)
		ans.TotalMS = ms(time.Since(started))
		ans.Calls = []float64{ans.TotalMS}
	case "parallel":
		var mu sync.Mutex
		var wg sync.WaitGroup
		ready, start := sync.WaitGroup{}, make(chan struct{})
		ans.Calls = make([]float64, len(claims))
		ready.Add(len(claims))
		for i, c := range claims {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ready.Done()
				<-start
				t := time.Now()
				errs := call([]claim{c})
				elapsed := ms(time.Since(t))
				mu.Lock()
				ans.Calls[i] = elapsed
				ans.Errors = append(ans.Errors, errs...)
				mu.Unlock()
			}()
		}
		ready.Wait()
		started := time.Now()
		close(start)
		wg.Wait()
		ans.TotalMS = ms(time.Since(started))
	default:
		return fail(fmt.Errorf("unknown mode %q", mode))
	}
	return ans
}
