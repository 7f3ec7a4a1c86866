import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { API_PORT, KUBERNETES_SERVICE_IP, NODE_IP, NODE_NAME, PKI } from './layout.js';

/**
 * The cluster's certificates and kubeconfigs, made with openssl at every start: one CA, the API
 * server's serving certificate, and a client certificate per identity. The identities are the
 * ones Kubernetes' bootstrap RBAC policy and Node authorizer know (system:kube-scheduler,
 * system:node:NAME in system:nodes, …), so the real authorizers decide as on any cluster.
 */

export interface Identity {
  /** File stem under pki/ and of the kubeconfig. */
  name: string;
  user: string;
  groups?: string[];
}

export const IDENTITIES = {
  admin: { name: 'admin', user: 'kubernetes-admin', groups: ['system:masters'] },
  controllerManager: { name: 'controller-manager', user: 'system:kube-controller-manager' },
  scheduler: { name: 'scheduler', user: 'system:kube-scheduler' },
  kubelet: { name: 'kubelet', user: `system:node:${NODE_NAME}`, groups: ['system:nodes'] },
  kubeProxy: { name: 'kube-proxy', user: 'system:kube-proxy' },
  // The API server's identity towards kubelets (logs, exec, port-forward).
  apiServerKubeletClient: {
    name: 'apiserver-kubelet-client',
    user: 'kube-apiserver-kubelet-client',
    groups: ['system:masters'],
  },
} satisfies Record<string, Identity>;

export const CA_CERT = join(PKI, 'ca.crt');
export const CA_KEY = join(PKI, 'ca.key');
export const SERVICE_ACCOUNT_KEY = join(PKI, 'sa.key');
export const SERVICE_ACCOUNT_PUBLIC_KEY = join(PKI, 'sa.pub');
export const API_SERVER_CERT = join(PKI, 'apiserver.crt');
export const API_SERVER_KEY = join(PKI, 'apiserver.key');

export const certPath = (identity: Identity): string => join(PKI, `${identity.name}.crt`);
export const keyPath = (identity: Identity): string => join(PKI, `${identity.name}.key`);
export const kubeconfigPath = (identity: Identity): string =>
  join(PKI, `${identity.name}.kubeconfig`);

function openssl(args: string[], input?: string): string {
  return execFileSync('openssl', args, {
    input,
    encoding: 'utf8',
    stdio: ['pipe', 'pipe', 'pipe'],
  });
}

/** An EC P-256 key (fast to make, and every Kubernetes component accepts it). */
function newKey(path: string): void {
  openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', path]);
}

function sign(stem: string, subject: string, extensions: string): void {
  const key = join(PKI, `${stem}.key`);
  newKey(key);
  const request = openssl(['req', '-new', '-key', key, '-subj', subject]);
  const extensionsFile = join(PKI, `${stem}.ext`);
  writeFileSync(extensionsFile, extensions);
  openssl(
    ['x509', '-req', '-CA', CA_CERT, '-CAkey', CA_KEY, '-CAcreateserial', '-days', '365'].concat([
      '-extfile',
      extensionsFile,
      '-out',
      join(PKI, `${stem}.crt`),
    ]),
    request,
  );
}

const base64 = (path: string): string => readFileSync(path).toString('base64');

/** A kubeconfig for one identity (JSON, which is YAML too). */
export function kubeconfigFor(identity: Identity): string {
  return JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [
        {
          name: 'mirrord-dev',
          cluster: {
            server: `https://${NODE_IP}:${API_PORT}`,
            'certificate-authority-data': base64(CA_CERT),
          },
        },
      ],
      users: [
        {
          name: identity.user,
          user: {
            'client-certificate-data': base64(certPath(identity)),
            'client-key-data': base64(keyPath(identity)),
          },
        },
      ],
      contexts: [
        {
          name: 'mirrord-dev',
          context: { cluster: 'mirrord-dev', user: identity.user, namespace: 'default' },
        },
      ],
      'current-context': 'mirrord-dev',
    },
    null,
    2,
  );
}

/** Makes the CA, the API server's certificate, the service-account key and every identity. */
export function createPki(): void {
  mkdirSync(PKI, { recursive: true, mode: 0o700 });
  newKey(CA_KEY);
  openssl(
    ['req', '-x509', '-new', '-key', CA_KEY, '-subj', '/CN=mirrord-dev-ca', '-days', '3650'].concat(
      ['-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-out', CA_CERT],
    ),
  );
  newKey(SERVICE_ACCOUNT_KEY);
  writeFileSync(
    SERVICE_ACCOUNT_PUBLIC_KEY,
    openssl(['pkey', '-in', SERVICE_ACCOUNT_KEY, '-pubout']),
  );
  const names = [
    'kubernetes',
    'kubernetes.default',
    'kubernetes.default.svc',
    'kubernetes.default.svc.cluster.local',
    'localhost',
  ];
  sign(
    'apiserver',
    '/CN=kube-apiserver',
    [
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth',
      `subjectAltName=${names.map((n) => `DNS:${n}`).join(',')},IP:${NODE_IP},IP:127.0.0.1,IP:${KUBERNETES_SERVICE_IP}`,
    ].join('\n'),
  );
  for (const identity of Object.values(IDENTITIES) as Identity[]) {
    const organisations = (identity.groups ?? []).map((group) => `/O=${group}`).join('');
    sign(
      identity.name,
      `${organisations}/CN=${identity.user}`,
      'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n',
    );
    writeFileSync(kubeconfigPath(identity), kubeconfigFor(identity), { mode: 0o600 });
  }
}
