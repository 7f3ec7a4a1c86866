import { homedir } from 'node:os';
import { join } from 'node:path';

/**
 * Where the test cluster lives and which addresses it uses. Everything it makes on the host is
 * named here, so that a stop (or the next start, after a killed run) finds all of it.
 *
 * Addresses come from 10.213.0.0/16, the range tests may send to, which the host blackholes:
 * the node's own address sits on the loopback interface, pods get addresses on a bridge, and
 * Services are virtual addresses that kube-proxy translates. Pods are routed only into that
 * range, so nothing in the cluster can reach past this machine.
 */
export const NODE_NAME = 'mirrord-dev';
export const NODE_IP = '10.213.127.1';
export const POD_CIDR = '10.213.128.0/18';
export const POD_GATEWAY = '10.213.128.1';
export const BRIDGE = 'mirrord-cni0';
export const SERVICE_CIDR = '10.213.192.0/20';
/** The Service range's first address is the `kubernetes` Service; kubeadm's DNS address is the tenth. */
export const KUBERNETES_SERVICE_IP = '10.213.192.1';
export const DNS_SERVICE_IP = '10.213.192.10';
export const TEST_RANGE = '10.213.0.0/16';
export const CLUSTER_DOMAIN = 'cluster.local';
export const API_PORT = 6443;
/** Not etcd's default ports, so an etcd the developer runs is left alone. */
export const ETCD_CLIENT_PORT = 23790;
export const ETCD_PEER_PORT = 23800;

/** The cache that build.sh and images.sh fill (binaries, images), kept between runs. */
export const CACHE =
  process.env.MIRRORD_DEV_CACHE ??
  join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'mirrord-dev');

/** A running cluster's files: certificates, configs, logs, etcd's data, the kubelet's root. */
export const RUN = join(CACHE, 'cluster');
export const PKI = join(RUN, 'pki');
export const LOGS = join(RUN, 'logs');
/** The pid of the process that started the cluster (tests reuse a cluster whose owner lives). */
export const OWNER_FILE = join(RUN, 'owner');
/** A file per cluster process, holding its pid, for stop.sh. */
export const PIDS = join(RUN, 'pids');
export const ETCD_DATA = join(RUN, 'etcd');
export const KUBELET_ROOT = join(RUN, 'kubelet');
export const CNI_CONF = join(RUN, 'cni');
export const CNI_IPAM = join(RUN, 'cni-ipam');
/** containerd's images and snapshots: kept across starts, so images are imported once. */
export const CONTAINERD_ROOT = join(CACHE, 'containerd');
/** containerd's state (shims, sockets, pod netns mounts): a tmpfs, as containerd expects. */
export const CONTAINERD_STATE = '/run/mirrord-dev/containerd';
export const CONTAINERD_SOCKET = '/run/mirrord-dev/containerd.sock';
