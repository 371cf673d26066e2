//! Static files embedded in the binary: the browser client, the demo live room and the admin
//! page.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const LIVEPUSH_JS: &str = include_str!("../../../clients/js/livepush.js");
const DEMO_HTML: &str = include_str!("../../../clients/demo/index.html");
const DEMO_JS: &str = include_str!("../../../clients/demo/app.js");
const DEMO_CSS: &str = include_str!("../../../clients/demo/style.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /livepush.js`: the browser client, an ES module.
pub async fn client_js() -> Response {
    file("text/javascript; charset=utf-8", LIVEPUSH_JS)
}

/// `GET /`: the demo live room.
pub async fn demo_html() -> Response {
    file("text/html; charset=utf-8", DEMO_HTML)
}

/// `GET /demo/app.js`
pub async fn demo_js() -> Response {
    file("text/javascript; charset=utf-8", DEMO_JS)
}

/// `GET /demo/style.css`
pub async fn demo_css() -> Response {
    file("text/css; charset=utf-8", DEMO_CSS)
}

const ADMIN_HTML: &str = include_str!("../../../clients/admin/index.html");
const ADMIN_JS: &str = include_str!("../../../clients/admin/app.js");
const ADMIN_CSS: &str = include_str!("../../../clients/admin/style.css");

/// `GET /admin`: the admin page (it asks for the API key; see [`crate::admin`]).
pub async fn admin_html() -> Response {
    file("text/html; charset=utf-8", ADMIN_HTML)
}

/// `GET /admin/app.js`
pub async fn admin_js() -> Response {
    file("text/javascript; charset=utf-8", ADMIN_JS)
}

/// `GET /admin/style.css`
pub async fn admin_css() -> Response {
    file("text/css; charset=utf-8", ADMIN_CSS)
}
