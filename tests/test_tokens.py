"""Tokens: generation, nova's digest and nova's access URLs."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlparse

from twisted.trial.unittest import SynchronousTestCase

from consoled.tokens import ConnectInfo, IssuedToken, access_url, hash_prefix, hash_token, new_token

TOKEN = "2f6a4bd5-7e0b-4c8e-9a55-1f0c3f2d8e61"
# printf %s "$TOKEN" | sha256sum
DIGEST = "795f320804ab28ff224cb5b96f54635e7c4bd802ce7dbe943ef14e5dbe2da809"


class TokenTests(SynchronousTestCase):
    def test_new_token_is_a_uuid4(self) -> None:
        """A token is the string form of a random version-4 UUID, as nova's."""
        token = new_token()
        self.assertEqual(uuid.UUID(token).version, 4)
        self.assertEqual(str(uuid.UUID(token)), token)
        self.assertNotEqual(new_token(), token)

    def test_digest_is_nova_sha256(self) -> None:
        """The stored digest equals coreutils' sha256sum of the token: what nova stores."""
        self.assertEqual(hash_token(TOKEN), DIGEST)
        self.assertEqual(hash_prefix(DIGEST), "795f3208")

    def test_novnc_url(self) -> None:
        """noVNC gets the token inside its path parameter, url-encoded, as nova builds it."""
        self.assertEqual(
            access_url("novnc", "http://h:6080/vnc_auto.html", TOKEN),
            f"http://h:6080/vnc_auto.html?path=%3Ftoken%3D{TOKEN}",
        )

    def test_novnc_url_with_path_in_base(self) -> None:
        """A base URL that already has a path parameter gets the token appended to it."""
        url = access_url("novnc", "https://h/vnc_lite.html?path=websockify&scale=1", TOKEN)
        query = parse_qs(urlparse(url).query)
        self.assertEqual(query["path"], [f"websockify?token={TOKEN}"])
        self.assertEqual(query["scale"], ["1"])

    def test_novnc_url_with_other_query(self) -> None:
        """Another query in the base is kept and the path parameter is merged with '&'."""
        url = access_url("novnc", "https://h/vnc_lite.html?scale=1", TOKEN)
        self.assertEqual(url, f"https://h/vnc_lite.html?scale=1&path=%3Ftoken%3D{TOKEN}")

    def test_other_types(self) -> None:
        """Every other console type gets ?token= appended to its base."""
        for console_type, base in [
            ("spice-html5", "http://h:6082/spice_auto.html"),
            ("serial", "ws://h:6083/"),
            ("webmks", "http://h:6090/"),
            ("xvpvnc", "http://h:6081/console"),
        ]:
            self.assertEqual(access_url(console_type, base, TOKEN), f"{base}?token={TOKEN}")

    def test_issued_token_repr_hides_token(self) -> None:
        """An IssuedToken printed in a traceback or a log shows no token."""
        info = ConnectInfo(1, DIGEST, "serial", "h", 1, None, None, str(uuid.uuid4()), "ws://h/", 0)
        issued = IssuedToken(TOKEN, info)
        self.assertNotIn(TOKEN, repr(issued))
        self.assertEqual(issued.access_url, f"ws://h/?token={TOKEN}")
