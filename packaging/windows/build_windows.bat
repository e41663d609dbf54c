@echo off
rem Double-clickable wrapper for build_windows.ps1 (same arguments).
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0build_windows.ps1" %*
exit /b %ERRORLEVEL%
