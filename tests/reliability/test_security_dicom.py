"""Who may talk to the DICOM listener: client IP networks, calling AE titles, DICOM TLS, timeouts.

Everything is real: an in-process listener and store (``InProcessNode``) on localhost, pynetdicom
and dcmtk ``storescu`` as clients. "Another host" is a client socket bound to 127.0.0.2 (all of
127.0.0.0/8 is loopback on Linux). The certificates (a throwaway CA, the node's server
certificate, a client certificate, and a client certificate from a second, untrusted CA) are made
by the ``openssl`` CLI in a temporary folder; the test skips when ``openssl`` is absent.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from rel_support import InProcessNode, wait_until
from support.dcmtk import find_tool, store_responses, storescu
from support.dicom_factory import US_IMAGE_STORAGE, busi_as_ultrasound, write_dataset

from dicom_node.security import address_allowed, client_ssl_context
from dicom_node.validation import STATUS_SUCCESS

OTHER_HOST = "127.0.0.2"


def _dataset(tmp: Path) -> Dataset:
    png = tmp / "grey.png"
    if not png.exists():
        grey = np.random.default_rng(1).integers(0, 255, (16, 16), dtype=np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(png)
    return busi_as_ultrasound(png, patient_id="SECURITY")


def _associate(
    port: int,
    *,
    host: str = "127.0.0.1",
    calling: str = "STORESCU",
    bind: str | None = None,
    tls: tuple[ssl.SSLContext, str] | None = None,
) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(US_IMAGE_STORAGE)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    return ae.associate(
        host,
        port,
        ae_title="BREASTCAD",
        bind_address=(bind, 0) if bind is not None else None,
        tls_args=tls,
    )


def _store_one(assoc: Association, tmp: Path) -> int:
    try:
        response = assoc.send_c_store(_dataset(tmp))
        return int(response.Status) if "Status" in response else -1
    finally:
        assoc.release()


def _refused_before_association(assoc: Association) -> bool:
    """Neither accepted nor answered with A-ASSOCIATE-RJ: the connection was closed."""
    return not assoc.is_established and not assoc.is_rejected


# --- IP networks and calling AE titles -------------------------------------------------------


def test_address_allowed_v4_v6_and_mapped() -> None:
    nets = [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")]
    assert address_allowed("10.1.200.3", nets)
    assert not address_allowed("10.2.0.1", nets)
    assert address_allowed("fd12::1", nets)
    assert not address_allowed("fe80::1%lo", nets)
    assert address_allowed("::ffff:10.1.0.9", nets)  # a v4 client on a dual-stack socket
    assert not address_allowed("not-an-address", nets)
    assert address_allowed("192.0.2.1", [])  # empty: everyone


def test_client_outside_allowed_networks_is_refused_inside_is_served(tmp_path: Path) -> None:
    node = InProcessNode(tmp_path / "var", allowed_networks=["127.0.0.1/32"])
    node.start()
    try:
        outsider = _associate(node.port, bind=OTHER_HOST)
        assert _refused_before_association(outsider)
        assert node.rows() == {}
        insider = _associate(node.port, bind="127.0.0.1")
        assert insider.is_established
        assert _store_one(insider, tmp_path) == STATUS_SUCCESS
        assert len(node.rows()) == 1
    finally:
        node.stop()


def test_allowed_network_of_the_other_host(tmp_path: Path) -> None:
    """The list decides, not loopback-ness: 127.0.0.2 allowed, 127.0.0.1 not."""
    node = InProcessNode(tmp_path / "var", allowed_networks=["127.0.0.2/32", "::1/128"])
    node.start()
    try:
        assert _refused_before_association(_associate(node.port, bind="127.0.0.1"))
        other = _associate(node.port, bind=OTHER_HOST)
        assert other.is_established
        assert _store_one(other, tmp_path) == STATUS_SUCCESS
    finally:
        node.stop()


def test_networks_and_calling_aets_both_apply(tmp_path: Path) -> None:
    node = InProcessNode(
        tmp_path / "var",
        allowed_networks=["127.0.0.1/32"],
        allowed_calling_aets=["MODALITY1"],
    )
    node.start()
    try:
        # right network, unknown calling AE: A-ASSOCIATE-RJ permanent, calling AE not recognised
        wrong_aet = _associate(node.port, bind="127.0.0.1", calling="INTRUDER")
        assert wrong_aet.is_rejected
        assert wrong_aet.acceptor.primitive is not None
        rejection = wrong_aet.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
        # known calling AE from outside the networks: closed before any association
        assert _refused_before_association(
            _associate(node.port, bind=OTHER_HOST, calling="MODALITY1")
        )
        good = _associate(node.port, bind="127.0.0.1", calling="MODALITY1")
        assert good.is_established
        assert _store_one(good, tmp_path) == STATUS_SUCCESS
    finally:
        node.stop()


def test_allowed_networks_over_ipv6(tmp_path: Path) -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    for networks, expect_ok in ((["::1/128"], True), (["127.0.0.0/8", "fd00::/8"], False)):
        node = InProcessNode(tmp_path / f"var-{expect_ok}", allowed_networks=networks)
        node.settings = node.scp.settings = node.settings.model_copy(update={"dicom_host": "::1"})
        node.start()
        try:
            assoc = _associate(node.port, host="::1")
            if expect_ok:
                assert assoc.is_established, networks
                assert _store_one(assoc, tmp_path) == STATUS_SUCCESS
            else:
                assert _refused_before_association(assoc), networks
        finally:
            node.stop()


# --- timeouts: a silent connection frees its slot ----------------------------------------------


def test_silent_tcp_connection_frees_its_association_slot_after_acse_timeout(
    tmp_path: Path,
) -> None:
    node = InProcessNode(tmp_path / "var", maximum_associations=1, acse_timeout_seconds=2)
    node.start()
    try:
        with socket.create_connection(("127.0.0.1", node.port)) as silent:
            # the silent connection is an association in waiting: it holds the only slot
            def held() -> bool:
                assoc = _associate(node.port)
                if assoc.is_established:
                    assoc.release()
                    return False
                return assoc.is_rejected

            wait_until(held, 10, "the silent connection to take the slot", step=0.1)

            # ... until the ACSE timeout ends it (the default 30 s would outlast this wait)
            def free() -> bool:
                assoc = _associate(node.port)
                if assoc.is_established:
                    assert _store_one(assoc, tmp_path) == STATUS_SUCCESS
                    return True
                return False

            wait_until(free, 20, "the slot to be freed after acse_timeout_seconds", step=0.5)
            silent.settimeout(5)
            assert silent.recv(1) == b"", "the node closed the silent connection"
    finally:
        node.stop()


# --- DICOM TLS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", key.name, "-out", cert.name, "-subj", f"/CN=breastcad test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    folder: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions + "\nbasicConstraints=CA:FALSE\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name,
        "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-out", cert.name, "-extfile", ext.name,
        cwd=folder,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (needed to make test certificates)")
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "ca")
    other_ca = _make_ca(folder, "other-ca")
    server = _make_leaf(
        folder,
        "localhost",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    client = _make_leaf(folder, "modality", ca, "extendedKeyUsage=clientAuth")
    rogue = _make_leaf(folder, "rogue", other_ca, "extendedKeyUsage=clientAuth")
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1], other_ca[0])


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[InProcessNode]:
    node = InProcessNode(
        tmp_path / "var",
        tls_certificate=pki.server_cert,
        tls_private_key=pki.server_key,
        tls_ca_certificates=pki.ca,
        tls_require_client_certificate=True,
        acse_timeout_seconds=3,
    )
    node.start()
    yield node
    node.stop()


def test_tls_client_with_valid_certificate_stores(
    tls_node: InProcessNode, pki: Pki, tmp_path: Path
) -> None:
    context = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
    assoc = _associate(tls_node.port, tls=(context, "localhost"))
    assert assoc.is_established
    assert _store_one(assoc, tmp_path) == STATUS_SUCCESS
    assert len(tls_node.rows()) == 1


def test_tls_storescu_with_certificate_stores(
    tls_node: InProcessNode, pki: Pki, tmp_path: Path
) -> None:
    if find_tool("storescu") is None:
        pytest.skip("dcmtk storescu is not installed")
    path = write_dataset(_dataset(tmp_path), tmp_path / "one.dcm")
    done = storescu(
        [path],
        "127.0.0.1",
        tls_node.port,
        extra_args=["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)],
    )
    assert store_responses(done) == ["Success"], done.stdout + done.stderr
    assert len(tls_node.rows()) == 1


def test_tls_client_without_certificate_is_refused_when_required(
    tls_node: InProcessNode, pki: Pki, tmp_path: Path
) -> None:
    anonymous = _associate(tls_node.port, tls=(client_ssl_context(pki.ca), "localhost"))
    assert not anonymous.is_established
    rogue = _associate(
        tls_node.port,
        tls=(client_ssl_context(pki.ca, pki.rogue_cert, pki.rogue_key), "localhost"),
    )
    assert not rogue.is_established
    assert tls_node.rows() == {}
    # the listener goes on serving a client that presents a valid certificate
    good = _associate(
        tls_node.port,
        tls=(client_ssl_context(pki.ca, pki.client_cert, pki.client_key), "localhost"),
    )
    assert good.is_established
    assert _store_one(good, tmp_path) == STATUS_SUCCESS


def test_plain_tcp_client_is_refused_by_tls_listener(
    tls_node: InProcessNode, pki: Pki, tmp_path: Path
) -> None:
    plain = _associate(tls_node.port)
    assert _refused_before_association(plain)
    if find_tool("storescu") is not None:
        path = write_dataset(_dataset(tmp_path), tmp_path / "plain.dcm")
        done = storescu([path], "127.0.0.1", tls_node.port)
        assert done.returncode != 0
        assert store_responses(done) == []
    assert tls_node.rows() == {}


def test_tls_handshake_of_a_silent_client_blocks_nobody(
    tls_node: InProcessNode, pki: Pki, tmp_path: Path
) -> None:
    """A client that connects and never starts TLS neither stalls the accept loop nor takes a slot;
    the node closes it after acse_timeout_seconds."""
    context = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", tls_node.port)) as silent:
        time.sleep(0.3)
        good = _associate(tls_node.port, tls=(context, "localhost"))
        assert good.is_established
        assert _store_one(good, tmp_path) == STATUS_SUCCESS
        silent.settimeout(20)
        assert silent.recv(1) == b""


def test_tls_without_required_client_certificate_accepts_anonymous_clients(
    tmp_path: Path, pki: Pki
) -> None:
    node = InProcessNode(
        tmp_path / "var", tls_certificate=pki.server_cert, tls_private_key=pki.server_key
    )
    node.start()
    try:
        assoc = _associate(node.port, tls=(client_ssl_context(pki.ca), "localhost"))
        assert assoc.is_established
        assert _store_one(assoc, tmp_path) == STATUS_SUCCESS
        assert _refused_before_association(_associate(node.port))  # still TLS only
    finally:
        node.stop()


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    from pydantic import ValidationError

    from dicom_node.security import TLSConfigError, server_ssl_context
    from dicom_node.settings import Settings

    with pytest.raises(ValidationError, match="together"):
        Settings(tls_certificate=pki.server_cert)
    with pytest.raises(ValidationError, match="tls_ca_certificates"):
        Settings(
            tls_certificate=pki.server_cert,
            tls_private_key=pki.server_key,
            tls_require_client_certificate=True,
        )
    with pytest.raises(TLSConfigError, match="cannot load"):
        server_ssl_context(
            Settings(tls_certificate=pki.server_cert, tls_private_key=pki.client_key)
        )


# --- our sender to a destination with `tls: true` ---------------------------------------------


def test_sender_delivers_over_tls_to_a_destination_that_requires_it(
    tls_node: InProcessNode, pki: Pki, tmp_path: Path
) -> None:
    from dicom_node.scu import DeliveryError, send_files
    from dicom_node.settings import Destination

    path = write_dataset(_dataset(tmp_path), tmp_path / "result.dcm")

    def destination(**tls: object) -> Destination:
        return Destination.model_validate(
            {"host": "127.0.0.1", "port": tls_node.port, "ae_title": "BREASTCAD", **tls}
        )

    with pytest.raises(DeliveryError):  # plain TCP to a TLS peer
        send_files(destination(), [path], calling_ae="SENDER")
    with pytest.raises(DeliveryError):  # no client certificate, the peer requires one
        send_files(destination(tls=True, tls_ca_certificates=pki.ca), [path], calling_ae="SENDER")
    with pytest.raises(DeliveryError):  # the peer's certificate is not from the CA we trust
        send_files(
            destination(
                tls=True,
                tls_ca_certificates=pki.other_ca,
                tls_certificate=pki.client_cert,
                tls_private_key=pki.client_key,
            ),
            [path],
            calling_ae="SENDER",
        )
    with pytest.raises(DeliveryError, match="TLS files"):
        send_files(
            destination(tls=True, tls_ca_certificates=tmp_path / "missing.pem"),
            [path],
            calling_ae="SENDER",
        )
    assert tls_node.rows() == {}
    send_files(
        destination(
            tls=True,
            tls_ca_certificates=pki.ca,
            tls_certificate=pki.client_cert,
            tls_private_key=pki.client_key,
        ),
        [path],
        calling_ae="SENDER",
    )
    assert len(tls_node.rows()) == 1
