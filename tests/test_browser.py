"""The API Keys page in a real browser, then a Grounded Answer over real HTTP.

Debian's headless chromium, driven through chromedriver by Selenium, talks to
pytest-django's live server on 127.0.0.1. Without the browser the tests skip,
unless GATECO_REQUIRE_SERVICES=1 makes that a failure.
"""

import json
import os
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from answers.models import AnswerAudit
from keyvault.vault import get_llm_api_key

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/gateco-settings.png")
PAGE_PATH = "/settings/api-keys/"
BROWSER_KEY = "sk-browser-typed-key-5555555555555555BRW4"
WAIT_SECONDS = 15
KEY_STATUS = (By.CSS_SELECTOR, "[data-testid=key-status]")
FORM_ERROR = (By.CSS_SELECTOR, ".errorlist")
LOGIN_BUTTON = "form[action='/accounts/login/'] button"

# Headless, with no proxy and with the background services these flags name
# (component updates, sync, phishing detection, translation) turned off,
# because they would otherwise contact Google.
CHROMIUM_ARGUMENTS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,PasswordLeakDetection",
    "--window-size=1280,900",
]

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def require_browser():
    """Skip unless chromium and chromedriver are installed, or fail in CI."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if not missing:
        return
    message = f"{' and '.join(missing)} not found. Install Debian's chromium-driver"
    if os.environ.get("GATECO_REQUIRE_SERVICES") == "1":
        pytest.fail(message + ". GATECO_REQUIRE_SERVICES=1 makes this a failure.")
    pytest.skip(message + ", or set GATECO_REQUIRE_SERVICES=1 to fail instead.")


def loopback_url(live_server):
    # The live server binds an IPv4 socket for "localhost", so naming
    # 127.0.0.1 reaches it without resolving a host name.
    return live_server.url.replace("://localhost:", "://127.0.0.1:")


@pytest.fixture
def browser(tmp_path):
    require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # A Service with a driver path keeps Selenium Manager, which downloads
    # drivers, from running.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def sign_in(browser, base_url, username):
    """Open the API Keys page and sign in as `username` on the login page."""
    browser.get(base_url + PAGE_PATH)
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(expected_conditions.url_contains("/accounts/login/"))
    browser.find_element(By.ID, "id_username").send_keys(username)
    browser.find_element(By.ID, "id_password").send_keys(f"{username}-password")
    browser.find_element(By.CSS_SELECTOR, LOGIN_BUTTON).click()
    wait.until(expected_conditions.url_to_be(base_url + PAGE_PATH))
    wait.until(expected_conditions.visibility_of_element_located(KEY_STATUS))


def submit_key(browser, value):
    field = browser.find_element(By.ID, "id_llm_api_key")
    field.send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "button[name=action][value=save]").click()


def post_answer(base_url, api_key, body):
    """POST a Grounded Answer request with urllib and return (status, JSON body)."""
    request = urllib.request.Request(
        base_url + "/api/answers/execute",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": api_key},
        method="POST",
    )
    # An empty ProxyHandler ignores any *_proxy environment variables.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=WAIT_SECONDS) as response:
        return response.status, json.loads(response.read())


def test_typed_key_pays_for_answer(
    transactional_db, live_server, browser, demo, owner, api_key, openai_server
):
    base_url = loopback_url(live_server)
    sign_in(browser, base_url, "owner")
    assert browser.find_element(*KEY_STATUS).text == "Not set"

    submit_key(browser, BROWSER_KEY)
    WebDriverWait(browser, WAIT_SECONDS).until(
        expected_conditions.text_to_be_present_in_element(KEY_STATUS, "Set, ending in")
    )
    browser.save_screenshot(str(SCREENSHOT))

    assert browser.find_element(*KEY_STATUS).text == "Set, ending in BRW4"
    assert browser.find_element(By.ID, "id_llm_api_key").get_attribute("value") == ""
    assert BROWSER_KEY not in browser.page_source
    assert BROWSER_KEY[:-4] not in browser.page_source
    assert get_llm_api_key(demo.organization).reveal() == BROWSER_KEY

    status, body = post_answer(
        base_url,
        api_key,
        {
            "query": "What was revenue in the third quarter?",
            "principal_id": demo.alice.external_id,
            "connector_id": str(demo.connector.id),
        },
    )

    assert status == 200
    assert body["outcome"] == "answered"
    assert body["key_source"] == "organization"
    # The key was checked against the model list on save, then paid for the answer.
    assert [(r["path"], r["key_last4"]) for r in openai_server.requests] == [
        ("/v1/models", "BRW4"),
        ("/v1/chat/completions", "BRW4"),
    ]
    assert AnswerAudit.objects.get().key_source == "organization"
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0


def test_invalid_typed_key_shows_error(
    transactional_db, live_server, browser, demo, owner
):
    base_url = loopback_url(live_server)
    sign_in(browser, base_url, "owner")

    submit_key(browser, "sk-too-short-BAD7")
    error = WebDriverWait(browser, WAIT_SECONDS).until(
        expected_conditions.visibility_of_element_located(FORM_ERROR)
    )

    assert "does not look like an OpenAI API key" in error.text
    assert browser.find_element(*KEY_STATUS).text == "Not set"
    assert browser.find_element(By.ID, "id_llm_api_key").get_attribute("value") == ""
    assert "BAD7" not in browser.page_source
    assert get_llm_api_key(demo.organization) is None
