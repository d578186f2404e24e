"""``render``: one pure function from a request to the seed's files (no I/O, no logging of contents)."""

from __future__ import annotations

from virtlet import errors
from virtlet.cloudinit import metadata, network, userdata
from virtlet.cloudinit.model import VOLUME_LABELS, CloudInitRequest, SeedFiles
from virtlet.cloudinit.options import parse_cloudinit_options

CONFIGDRIVE_DIR = "openstack/latest"

#: Largest rendered seed (all files together).  The annotations are at most 256 KiB; what can make the seed
#: larger is the container's environment (written to /etc/cloud/environment) and YAML re-written in block style.
MAX_SEED_BYTES = 1024 * 1024


def render(req: CloudInitRequest) -> SeedFiles:
    """Build the NoCloud or ConfigDrive file set for ``req``; raises ``errors.InvalidArgument`` on bad input.

    The network file is left out when there are no NICs (cloud-init then falls back to DHCP on its own).
    """
    opts = parse_cloudinit_options(req.annotations)
    env_bytes = len(userdata.environment_file(req.env).encode("utf-8", "surrogatepass"))
    if env_bytes > MAX_SEED_BYTES:  # refused before any YAML is written: that is the slow part
        raise errors.InvalidArgument(
            f"the container's environment is {env_bytes} bytes in {userdata.ENVIRONMENT_FILE}, more than the "
            f"{MAX_SEED_BYTES} bytes (1 MiB) the cloud-init seed may hold; pass large values another way")
    meta = metadata.meta_data_map(
        req.pod_name, req.pod_namespace, req.hostname, opts.ssh_keys, opts.meta_data, req.instance_id
    )
    user = userdata.render_user_data(opts, req.env, req.extra_user_data)
    plan = network.plan_network(req.nics, opts.force_dhcp)
    files: dict[str, bytes] = {}
    if opts.image_type == "configdrive":
        files[f"{CONFIGDRIVE_DIR}/meta_data.json"] = metadata.configdrive_meta_data(meta, req.pod_name)
        files[f"{CONFIGDRIVE_DIR}/user_data"] = user
        if plan:
            net = network.configdrive_network_data(plan, req.dns_servers)
            files[f"{CONFIGDRIVE_DIR}/network_data.json"] = net
    else:
        files["meta-data"] = metadata.nocloud_meta_data(meta)
        files["user-data"] = user
        if plan:
            write = network.nocloud_network_config_v2 if opts.network_config_version == 2 else \
                network.nocloud_network_config
            files["network-config"] = write(plan, req.dns_servers, req.dns_search)
    files.update(req.extra_files)
    total = sum(len(data) for data in files.values())
    if total > MAX_SEED_BYTES:
        sizes = ", ".join(f"{name} {len(data)} bytes" for name, data in sorted(files.items()))
        raise errors.InvalidArgument(
            f"the cloud-init seed would be {total} bytes ({sizes}), more than the {MAX_SEED_BYTES} bytes (1 MiB) "
            "allowed; make VirtletCloudInitUserData, VirtletCloudInitMetaData or the container's environment "
            "smaller")
    return SeedFiles(kind=opts.image_type, volume_label=VOLUME_LABELS[opts.image_type], files=files)
