package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceclaim"
	"k8s.io/dynamic-resource-allocation/resourceslice"
	"k8s.io/klog/v2"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

// maxDevicesPerSlice is resourceapi.ResourceSliceMaxDevices: more devices take more slices.
const maxDevicesPerSlice = resourceapi.ResourceSliceMaxDevices

type driver struct {
	name   string
	pool   string
	vendor string
	class  string
	count  int
	cdi    *cdiapi.Cache
	cancel context.CancelCauseFunc

	mu         sync.Mutex
	checkpoint *checkpoint
	// held maps a device to the claim holding it exclusively, rebuilt from the checkpoint.
	held map[string]string
}

var _ kubeletplugin.DRAPlugin = (*driver)(nil)

func newDriver(c config, cdi *cdiapi.Cache, cp *checkpoint, cancel context.CancelCauseFunc) *driver {
	d := &driver{
		name: c.driverName, pool: c.nodeName, vendor: c.cdiVendor, class: c.cdiClass,
		count: c.devices, cdi: cdi, cancel: cancel, checkpoint: cp, held: map[string]string{},
	}
	for uid, record := range cp.claims {
		for _, dev := range record.Devices {
			if !dev.AdminAccess && dev.ShareID == "" {
				d.held[dev.Device] = uid
			}
		}
	}
	return d
}

func deviceName(i int) string { return "dev-" + strconv.Itoa(i) }

// resources is the one pool of this node: the plain devices, at most 128 per slice.
func (d *driver) resources() resourceslice.DriverResources {
	memory := resource.MustParse("1Gi")
	model := "fake-basic"
	var slices []resourceslice.Slice
	for start := 0; start < d.count; start += maxDevicesPerSlice {
		var devices []resourceapi.Device
		for i := start; i < d.count && i < start+maxDevicesPerSlice; i++ {
			index := int64(i)
			devices = append(devices, resourceapi.Device{
				Name: deviceName(i),
				Attributes: map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{
					"model": {StringValue: &model},
					"index": {IntValue: &index},
				},
				Capacity: map[resourceapi.QualifiedName]resourceapi.DeviceCapacity{
					"memory": {Value: memory},
				},
			})
		}
		slices = append(slices, resourceslice.Slice{Devices: devices})
	}
	if len(slices) == 0 {
		slices = []resourceslice.Slice{{}}
	}
	return resourceslice.DriverResources{Pools: map[string]resourceslice.Pool{d.pool: {Slices: slices}}}
}

func (d *driver) known(device string) bool {
	i, err := strconv.Atoi(strings.TrimPrefix(device, "dev-"))
	return err == nil && strings.HasPrefix(device, "dev-") && deviceName(i) == device && i < d.count
}

func (d *driver) specName(uid string) string {
	return cdiapi.GenerateTransientSpecName(d.vendor, d.class, uid) + ".json"
}

func envName(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z':
			return r - 'a' + 'A'
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			return r
		}
		return '_'
	}, s)
}

func result(record claimRecord) kubeletplugin.PrepareResult {
	devices := make([]kubeletplugin.Device, 0, len(record.Devices))
	for _, dev := range record.Devices {
		out := kubeletplugin.Device{
			Requests:     []string{dev.Request},
			PoolName:     dev.Pool,
			DeviceName:   dev.Device,
			CDIDeviceIDs: dev.CDIDeviceIDs,
		}
		if dev.ShareID != "" {
			share := types.UID(dev.ShareID)
			out.ShareID = &share
		}
		devices = append(devices, out)
	}
	return kubeletplugin.PrepareResult{Devices: devices}
}

// PrepareResourceClaims prepares each claim; the helper has read and checked them already.
// The claims new to this call are recorded with one checkpoint write.
func (d *driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	var added []string
	for _, claim := range claims {
		uid := string(claim.UID)
		if record, ok := d.checkpoint.claims[uid]; ok {
			out[claim.UID] = result(record) // prepared before: the same answer, no side effect
			continue
		}
		record, err := d.prepare(claim)
		if err != nil {
			out[claim.UID] = kubeletplugin.PrepareResult{Err: err}
			continue
		}
		d.checkpoint.claims[uid] = record
		added = append(added, uid)
		out[claim.UID] = result(record)
	}
	if len(added) == 0 {
		return out, nil
	}
	if err := d.checkpoint.save(); err != nil {
		err = fmt.Errorf("checkpoint: %w", err)
		for _, uid := range added {
			record := d.checkpoint.claims[uid]
			delete(d.checkpoint.claims, uid)
			if record.CDISpec != "" {
				_ = d.cdi.RemoveSpec(record.CDISpec)
			}
			out[types.UID(uid)] = kubeletplugin.PrepareResult{Err: err}
		}
		return out, nil
	}
	for _, uid := range added {
		for _, dev := range d.checkpoint.claims[uid].Devices {
			if !dev.AdminAccess && dev.ShareID == "" {
				d.held[dev.Device] = uid
			}
		}
	}
	klog.FromContext(ctx).V(4).Info("prepared", "claims", added)
	return out, nil
}

// prepare checks the claim's devices of this driver and pool and writes its CDI spec.
func (d *driver) prepare(claim *resourceapi.ResourceClaim) (claimRecord, error) {
	uid := string(claim.UID)
	record := claimRecord{Namespace: claim.Namespace, Name: claim.Name, Devices: []preparedDevice{}}
	var mine []resourceapi.DeviceRequestAllocationResult
	for _, r := range claim.Status.Allocation.Devices.Results {
		if r.Driver != d.name || r.Pool != d.pool {
			continue
		}
		if !d.known(r.Device) {
			return record, fmt.Errorf("claim %s/%s: device %q is not published by this node", claim.Namespace, claim.Name, r.Device)
		}
		admin := r.AdminAccess != nil && *r.AdminAccess
		if holder, ok := d.held[r.Device]; ok && holder != uid && !admin && r.ShareID == nil {
			return record, fmt.Errorf("claim %s/%s: device %q is held by claim %s", claim.Namespace, claim.Name, r.Device, holder)
		}
		mine = append(mine, r)
	}
	if len(mine) == 0 {
		return record, nil
	}

	names := make([]string, 0, len(mine))
	byRequest := map[string][]string{}
	var requests []string
	for _, r := range mine {
		names = append(names, r.Device)
		base := resourceclaim.BaseRequestRef(r.Request)
		if _, ok := byRequest[base]; !ok {
			requests = append(requests, base)
		}
		byRequest[base] = append(byRequest[base], r.Device)
	}
	common := []string{
		"DRA_FAKE_CLAIM=" + claim.Namespace + "/" + claim.Name,
		"DRA_FAKE_DEVICES=" + strings.Join(names, ","),
	}
	for _, request := range requests {
		common = append(common, "DRA_FAKE_DEVICE_"+envName(request)+"="+strings.Join(byRequest[request], ","))
	}

	spec := &cdispec.Spec{Kind: d.vendor + "/" + d.class}
	for _, r := range mine {
		name := uid + "-" + r.Device
		env := append([]string(nil), common...)
		dev := preparedDevice{Request: r.Request, Pool: r.Pool, Device: r.Device}
		if r.ShareID != nil {
			dev.ShareID = string(*r.ShareID)
			name += "-" + dev.ShareID
			env = append(env, "DRA_FAKE_SHARE_ID_"+envName(r.Device)+"="+dev.ShareID)
		}
		dev.AdminAccess = r.AdminAccess != nil && *r.AdminAccess
		dev.CDIDeviceIDs = []string{spec.Kind + "=" + name}
		spec.Devices = append(spec.Devices, cdispec.Device{
			Name:           name,
			ContainerEdits: cdispec.ContainerEdits{Env: env},
		})
		record.Devices = append(record.Devices, dev)
	}
	version, err := cdiapi.MinimumRequiredVersion(spec)
	if err != nil {
		return record, fmt.Errorf("claim %s/%s: CDI version: %w", claim.Namespace, claim.Name, err)
	}
	spec.Version = version
	record.CDISpec = d.specName(uid)
	if err := d.cdi.WriteSpec(spec, record.CDISpec); err != nil {
		return record, fmt.Errorf("claim %s/%s: CDI spec: %w", claim.Namespace, claim.Name, err)
	}
	return record, nil
}

// UnprepareResourceClaims removes each claim's CDI spec and checkpoint record. Claims that
// are not prepared succeed; their spec is removed if one was left behind.
func (d *driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[types.UID]error, len(claims))
	removed := map[string]claimRecord{}
	for _, claim := range claims {
		uid := string(claim.UID)
		if err := d.cdi.RemoveSpec(d.specName(uid)); err != nil {
			out[claim.UID] = fmt.Errorf("remove CDI spec: %w", err)
			continue
		}
		out[claim.UID] = nil
		if record, ok := d.checkpoint.claims[uid]; ok {
			removed[uid] = record
			delete(d.checkpoint.claims, uid)
		}
	}
	if len(removed) == 0 {
		return out, nil
	}
	if err := d.checkpoint.save(); err != nil {
		err = fmt.Errorf("checkpoint: %w", err)
		for uid, record := range removed {
			d.checkpoint.claims[uid] = record
			out[types.UID(uid)] = err
		}
		return out, nil
	}
	for uid := range removed {
		for device, holder := range d.held {
			if holder == uid {
				delete(d.held, device)
			}
		}
	}
	klog.FromContext(ctx).V(4).Info("unprepared", "claims", len(removed))
	return out, nil
}

// HandleError logs background errors; a fatal one stops the plugin.
func (d *driver) HandleError(ctx context.Context, err error, msg string) {
	klog.FromContext(ctx).Error(err, msg)
	if !errors.Is(err, kubeletplugin.ErrRecoverable) {
		d.cancel(fmt.Errorf("%s: %w", msg, err))
	}
}

// WatchHealthStatus is not offered (the health service is turned off at Start).
func (d *driver) WatchHealthStatus(context.Context, chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}
