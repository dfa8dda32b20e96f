"""The rendered book builds from the committed outputs with warnings treated as errors.
(The build is the session fixture `book_build` of conftest.py, shared with test_browser.py.)"""


def test_book_builds_without_warnings(book_build):
    assert book_build.returncode == 0, book_build.output
    assert (book_build.html / "index.html").is_file(), book_build.output
    assert (book_build.html / "how_to_use.html").is_file()
