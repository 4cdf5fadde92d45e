// Command kubeletpeer drives a DRA kubelet plugin over its unix sockets the way the kubelet
// does, using the official generated clients of k8s.io/kubelet. It prints a JSON document of
// everything it saw and exits non-zero on any protocol error.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	drahealthv1 "k8s.io/kubelet/pkg/apis/dra-health/v1"
	drahealthv1alpha1 "k8s.io/kubelet/pkg/apis/dra-health/v1alpha1"
	drav1 "k8s.io/kubelet/pkg/apis/dra/v1"
	drav1beta1 "k8s.io/kubelet/pkg/apis/dra/v1beta1"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// servicesSupportedByKubelet mirrors the kubelet's preference list (1.34+).
var servicesSupportedByKubelet = []string{"v1.DRAPlugin", "v1beta1.DRAPlugin"}

// healthServicesSupportedByKubelet mirrors the kubelet's health preference (1.37+): it takes
// the first of these that the plugin advertises, whatever the plugin's order.
var healthServicesSupportedByKubelet = []string{
	drahealthv1.DRAResourceHealthService,
	drahealthv1alpha1.DRAResourceHealthService,
}

type infoOut struct {
	Type              string   `json:"type"`
	Name              string   `json:"name"`
	Endpoint          string   `json:"endpoint"`
	SupportedVersions []string `json:"supported_versions"`
}

type deviceOut struct {
	RequestNames []string `json:"request_names"`
	PoolName     string   `json:"pool_name"`
	DeviceName   string   `json:"device_name"`
	CDIDeviceIDs []string `json:"cdi_device_ids"`
	ShareID      *string  `json:"share_id"`
}

type prepareOut struct {
	Devices []deviceOut `json:"devices"`
	Error   string      `json:"error"`
}

type unprepareOut struct {
	Error string `json:"error"`
}

type healthDeviceOut struct {
	PoolName       string `json:"pool_name"`
	DeviceName     string `json:"device_name"`
	Health         string `json:"health"`
	LastUpdated    int64  `json:"last_updated_time"`
	TimeoutSeconds int64  `json:"health_check_timeout_seconds"`
	Message        string `json:"message"`
}

type report struct {
	Info          *infoOut                `json:"info,omitempty"`
	ChosenVersion string                  `json:"chosen_version,omitempty"`
	HealthOffered bool                    `json:"health_offered"`
	HealthVersion string                  `json:"health_version,omitempty"`
	Prepare       map[string]prepareOut   `json:"prepare,omitempty"`
	Unprepare     map[string]unprepareOut `json:"unprepare,omitempty"`
	Health        [][]healthDeviceOut     `json:"health,omitempty"`
	Error         string                  `json:"error,omitempty"`
}

type claim struct{ namespace, name, uid string }

func parseClaims(spec string) ([]claim, error) {
	var claims []claim
	if spec == "" {
		return nil, nil
	}
	for _, item := range strings.Split(spec, ",") {
		parts := strings.Split(item, "/")
		if len(parts) != 3 {
			return nil, fmt.Errorf("claim %q: want namespace/name/uid", item)
		}
		claims = append(claims, claim{parts[0], parts[1], parts[2]})
	}
	return claims, nil
}

func main() {
	regSocket := flag.String("registration-socket", "", "path of the plugin's registration socket")
	api := flag.String("api", "", "force the DRA API version: v1 or v1beta1 (default: the kubelet's choice)")
	prepare := flag.String("prepare", "", "claims to prepare: ns/name/uid,...")
	unprepare := flag.String("unprepare", "", "claims to unprepare: ns/name/uid,...")
	watchHealth := flag.Int("watch-health", 0, "read this many NodeWatchResources messages")
	healthAPI := flag.String("health-api", "", "force the health API version: v1 or v1alpha1 (default: the kubelet's choice)")
	healthTimeout := flag.Duration("health-timeout", 30*time.Second, "time limit for --watch-health")
	notifyFailure := flag.String("notify-failure", "", "send NotifyRegistrationStatus{false, this error} instead of success")
	flag.Parse()

	rep := &report{}
	err := run(rep, *regSocket, *api, *prepare, *unprepare, *watchHealth, *healthAPI, *healthTimeout, *notifyFailure)
	if err != nil {
		rep.Error = err.Error()
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if encErr := enc.Encode(rep); encErr != nil {
		fmt.Fprintln(os.Stderr, encErr)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeletpeer:", err)
		os.Exit(1)
	}
}

func dial(path string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix:"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

func run(rep *report, regSocket, api, prepareSpec, unprepareSpec string, watchHealth int,
	healthAPI string, healthTimeout time.Duration, notifyFailure string) error {
	if regSocket == "" {
		return errors.New("--registration-socket is required")
	}
	prepareClaims, err := parseClaims(prepareSpec)
	if err != nil {
		return err
	}
	unprepareClaims, err := parseClaims(unprepareSpec)
	if err != nil {
		return err
	}

	// Registration, as the kubelet's plugin watcher does it.
	regConn, err := dial(regSocket)
	if err != nil {
		return fmt.Errorf("dial registration socket: %w", err)
	}
	defer regConn.Close()
	regClient := registration.NewRegistrationClient(regConn)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	info, err := regClient.GetInfo(ctx, &registration.InfoRequest{})
	cancel()
	if err != nil {
		return fmt.Errorf("GetInfo: %w", err)
	}
	rep.Info = &infoOut{info.Type, info.Name, info.Endpoint, info.SupportedVersions}
	if info.Type != registration.DRAPlugin {
		return fmt.Errorf("GetInfo: type %q, want %q", info.Type, registration.DRAPlugin)
	}
	chosen := ""
	for _, v := range info.SupportedVersions {
		for _, k := range servicesSupportedByKubelet {
			if v == k && chosen == "" {
				chosen = v
			}
		}
	}
	if chosen == "" {
		return fmt.Errorf("none of the plugin's versions %v is supported (%v)", info.SupportedVersions, servicesSupportedByKubelet)
	}
	if api != "" {
		want := api + ".DRAPlugin"
		found := false
		for _, v := range info.SupportedVersions {
			found = found || v == want
		}
		if !found {
			return fmt.Errorf("forced API %s is not among the plugin's versions %v", want, info.SupportedVersions)
		}
		chosen = want
	}
	rep.ChosenVersion = chosen
	healthChosen, err := pickHealthService(info.SupportedVersions, healthAPI)
	if err != nil {
		return err
	}
	rep.HealthOffered = healthChosen != ""
	rep.HealthVersion = healthChosen
	status := &registration.RegistrationStatus{PluginRegistered: true}
	if notifyFailure != "" {
		status = &registration.RegistrationStatus{PluginRegistered: false, Error: notifyFailure}
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	_, err = regClient.NotifyRegistrationStatus(ctx, status)
	cancel()
	if err != nil {
		return fmt.Errorf("NotifyRegistrationStatus: %w", err)
	}

	endpoint := info.Endpoint
	if endpoint == "" {
		endpoint = regSocket
	}
	conn, err := dial(endpoint)
	if err != nil {
		return fmt.Errorf("dial DRA socket %s: %w", endpoint, err)
	}
	defer conn.Close()

	if len(prepareClaims) > 0 {
		if rep.Prepare, err = doPrepare(conn, chosen, prepareClaims); err != nil {
			return err
		}
	}
	if len(unprepareClaims) > 0 {
		if rep.Unprepare, err = doUnprepare(conn, chosen, unprepareClaims); err != nil {
			return err
		}
	}
	if watchHealth > 0 {
		if healthChosen == "" {
			return fmt.Errorf("--watch-health: the plugin advertises none of %v", healthServicesSupportedByKubelet)
		}
		if rep.Health, err = doWatch(conn, healthChosen, watchHealth, healthTimeout); err != nil {
			return err
		}
	}
	return nil
}

// pickHealthService chooses the health service as the kubelet does: the first of
// healthServicesSupportedByKubelet that the plugin advertises, "" if none. A forced version
// must be advertised.
func pickHealthService(advertised []string, force string) (string, error) {
	offered := map[string]bool{}
	for _, v := range advertised {
		offered[v] = true
	}
	if force != "" {
		want := force + ".DRAResourceHealth"
		if !offered[want] {
			return "", fmt.Errorf("forced health API %s is not among the plugin's versions %v", want, advertised)
		}
		return want, nil
	}
	for _, k := range healthServicesSupportedByKubelet {
		if offered[k] {
			return k, nil
		}
	}
	return "", nil
}

// checkKeys applies the kubelet's response checks: no unknown key, no missing claim.
func checkKeys[T any](call string, claims []claim, got map[string]T) error {
	want := map[string]bool{}
	for _, c := range claims {
		want[c.uid] = true
	}
	for uid := range got {
		if !want[uid] {
			return fmt.Errorf("%s: response contains unknown claim UID %q", call, uid)
		}
	}
	if len(got) < len(want) {
		return fmt.Errorf("%s skipped %d ResourceClaims", call, len(want)-len(got))
	}
	return nil
}

func doPrepare(conn *grpc.ClientConn, version string, claims []claim) (map[string]prepareOut, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	out := map[string]prepareOut{}
	switch version {
	case "v1.DRAPlugin":
		req := &drav1.NodePrepareResourcesRequest{}
		for _, c := range claims {
			req.Claims = append(req.Claims, &drav1.Claim{Namespace: c.namespace, Name: c.name, Uid: c.uid})
		}
		resp, err := drav1.NewDRAPluginClient(conn).NodePrepareResources(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("NodePrepareResources (v1): %w", err)
		}
		for uid, r := range resp.Claims {
			p := prepareOut{Error: r.Error, Devices: []deviceOut{}}
			for _, d := range r.Devices {
				p.Devices = append(p.Devices, deviceOut{d.RequestNames, d.PoolName, d.DeviceName, d.CdiDeviceIds, d.ShareId})
			}
			out[uid] = p
		}
		return out, checkKeys("NodePrepareResources", claims, resp.Claims)
	default:
		req := &drav1beta1.NodePrepareResourcesRequest{}
		for _, c := range claims {
			req.Claims = append(req.Claims, &drav1beta1.Claim{Namespace: c.namespace, Name: c.name, Uid: c.uid})
		}
		resp, err := drav1beta1.NewDRAPluginClient(conn).NodePrepareResources(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("NodePrepareResources (v1beta1): %w", err)
		}
		for uid, r := range resp.Claims {
			p := prepareOut{Error: r.Error, Devices: []deviceOut{}}
			for _, d := range r.Devices {
				p.Devices = append(p.Devices, deviceOut{d.RequestNames, d.PoolName, d.DeviceName, d.CdiDeviceIds, nil})
			}
			out[uid] = p
		}
		return out, checkKeys("NodePrepareResources", claims, resp.Claims)
	}
}

func doUnprepare(conn *grpc.ClientConn, version string, claims []claim) (map[string]unprepareOut, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	out := map[string]unprepareOut{}
	switch version {
	case "v1.DRAPlugin":
		req := &drav1.NodeUnprepareResourcesRequest{}
		for _, c := range claims {
			req.Claims = append(req.Claims, &drav1.Claim{Namespace: c.namespace, Name: c.name, Uid: c.uid})
		}
		resp, err := drav1.NewDRAPluginClient(conn).NodeUnprepareResources(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("NodeUnprepareResources (v1): %w", err)
		}
		for uid, r := range resp.Claims {
			out[uid] = unprepareOut{r.Error}
		}
		return out, checkKeys("NodeUnprepareResources", claims, resp.Claims)
	default:
		req := &drav1beta1.NodeUnprepareResourcesRequest{}
		for _, c := range claims {
			req.Claims = append(req.Claims, &drav1beta1.Claim{Namespace: c.namespace, Name: c.name, Uid: c.uid})
		}
		resp, err := drav1beta1.NewDRAPluginClient(conn).NodeUnprepareResources(ctx, req)
		if err != nil {
			return nil, fmt.Errorf("NodeUnprepareResources (v1beta1): %w", err)
		}
		for uid, r := range resp.Claims {
			out[uid] = unprepareOut{r.Error}
		}
		return out, checkKeys("NodeUnprepareResources", claims, resp.Claims)
	}
}

// doWatch reads n messages of the chosen health service. The v1 client is used directly; a
// v1alpha1 plugin is read through the official conversion wrapper, as the kubelet does.
func doWatch(conn *grpc.ClientConn, service string, n int, timeout time.Duration) ([][]healthDeviceOut, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var client drahealthv1.DRAResourceHealthClient
	switch service {
	case drahealthv1.DRAResourceHealthService:
		client = drahealthv1.NewDRAResourceHealthClient(conn)
	case drahealthv1alpha1.DRAResourceHealthService:
		client = drahealthv1.V1Alpha1ClientWrapper{Client: drahealthv1alpha1.NewDRAResourceHealthClient(conn)}
	default:
		return nil, fmt.Errorf("NodeWatchResources: unknown health service %q", service)
	}
	stream, err := client.NodeWatchResources(ctx, &drahealthv1.NodeWatchResourcesRequest{})
	if err != nil {
		return nil, fmt.Errorf("NodeWatchResources (%s): %w", service, err)
	}
	var msgs [][]healthDeviceOut
	for len(msgs) < n {
		resp, err := stream.Recv()
		if err == io.EOF {
			return msgs, fmt.Errorf("NodeWatchResources (%s): stream ended after %d of %d messages", service, len(msgs), n)
		}
		if err != nil {
			return msgs, fmt.Errorf("NodeWatchResources (%s): after %d of %d messages: %w", service, len(msgs), n, err)
		}
		var devs []healthDeviceOut
		for _, d := range resp.Devices {
			if d.Device == nil {
				return msgs, errors.New("NodeWatchResources: DeviceHealth without a device identifier")
			}
			devs = append(devs, healthDeviceOut{
				PoolName: d.Device.PoolName, DeviceName: d.Device.DeviceName, Health: d.Health.String(),
				LastUpdated: d.LastUpdatedTime, TimeoutSeconds: d.HealthCheckTimeoutSeconds, Message: d.Message,
			})
		}
		msgs = append(msgs, devs)
	}
	return msgs, nil
}
